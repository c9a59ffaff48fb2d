"""QLoRA: LoRA on a base model loaded in 4-bit NF4 through bitsandbytes, which needs a CUDA GPU.

The base is quantised as it loads (``load_kwargs``); the LoRA weights train in higher precision.
There is no merge: folding the update into 4-bit weights would re-quantise most of it away, so
merge by loading the base in full precision and the adapter with ``lora``'s loader.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch

from tunesmith.errors import TunesmithError
from tunesmith.methods import _peft, lora
from tunesmith.methods.base import Method


class Options(lora.Options):
    name: Literal["qlora"] = "qlora"


def check(cfg) -> list[str]:
    missing = []
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU found")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes is not installed")
    if not missing:
        return []
    return [f"method.name: qlora needs a CUDA GPU and the bitsandbytes package ({'; '.join(missing)}); "
            "use method.name=lora here"]


def load_kwargs(cfg) -> dict:
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=compute)
    # bitsandbytes quantises the weights on the GPU as they load.
    return {"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}}


def apply(model, cfg):
    from peft import prepare_model_for_kbit_training

    if not getattr(model, "is_loaded_in_4bit", False):
        raise TunesmithError("method.name: qlora needs the base model loaded with the method's load_kwargs (4-bit)")
    # Freezes the base and casts its remaining half-precision weights (norms, embeddings) to float32.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return lora.apply(model, cfg)


# bitsandbytes' 4-bit matmul is an autograd.Function in the old style (forward takes ctx), which
# torch.func's transforms refuse: no per-example gradients, so no private training.
METHOD = Method(name="qlora", options=Options, apply=apply, save=_peft.save, load=_peft.load, check=check,
                load_kwargs=load_kwargs, per_example_grads=False, disables=True)
