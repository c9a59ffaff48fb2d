"""An adapter directory that `tunesmith train` writes has what vLLM's LoRA loader reads
(docs/serving.md, "Serving the same adapters with vLLM"). vLLM itself needs a GPU and is not
installed: its loader's rules, read in vllm/lora/peft_helper.py (``PEFTHelper.from_dict``,
``validate_legal``), lora_model.py (``LoRAModel.from_local_checkpoint``) and utils.py
(``parse_fine_tuned_lora_name``), are restated here."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import review_rows, write_config, write_jsonl
from tunesmith.config import load_config
from tunesmith.recipe import run_training

VLLM_REQUIRED = ("r", "lora_alpha", "target_modules")
VLLM_DEFAULT_MAX_LORA_RANK = 16
# The linear layers vLLM's Llama takes LoRA on (its packed qkv_proj and gate_up_proj are filled from these).
LLAMA_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def vllm_problems(adapter) -> list[str]:
    """What vLLM's loader would refuse in ``adapter`` (a directory), as its code reads it."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    problems = [f"adapter_config.json: no {key}" for key in VLLM_REQUIRED if key not in config]
    if config.get("bias", "none") != "none":
        problems.append(f"bias {config['bias']!r}: vLLM takes 'none' only")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']}: vLLM takes none")
    if config.get("use_dora"):
        problems.append("use_dora: vLLM does not load DoRA")
    if config.get("r", 0) > VLLM_DEFAULT_MAX_LORA_RANK:
        problems.append(f"r {config['r']} above vLLM's default --max-lora-rank")
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        return [*problems, "no adapter_model.safetensors"]
    for name, tensor in load_file(weights).items():
        parts = name.split(".")
        if parts[:2] != ["base_model", "model"] or parts[-1] != "weight" or parts[-2] not in ("lora_A", "lora_B"):
            problems.append(f"{name}: not base_model.model.<module>.lora_A|lora_B.weight")
        elif parts[-3] not in LLAMA_LORA_MODULES:
            problems.append(f"{name}: module {parts[-3]} is not a LoRA target in vLLM's Llama")
        elif tensor.shape[0 if parts[-2] == "lora_A" else 1] != config.get("r"):
            problems.append(f"{name}: shape {tuple(tensor.shape)} does not have rank r={config.get('r')}")
    return problems


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("vllm")
    data = {"path": str(write_jsonl(tmp / "reviews.jsonl", review_rows(60))), "format": "classification",
            "columns": {"text": "review", "label": "sentiment"}, "instruction": "classify sentiment: {text}",
            "max_length": 64, "split": {"validation": 0.15, "test": 0.15}}
    config = write_config(tmp / "c.yaml", tiny_model_dir, data,
                          train={"max_steps": 2, "eval_every": 2, "save_every": 2, "mixed_precision": "no"})
    run_training(load_config(config))
    return tmp / "run" / "adapter"


def test_a_lora_adapter_has_what_vllm_loads(adapter):
    assert vllm_problems(adapter) == []
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"]
    names = load_file(adapter / "adapter_model.safetensors").keys()
    # Every linear layer of attention and MLP, each with both matrices.
    assert {n.split(".")[-3] for n in names} == LLAMA_LORA_MODULES
    assert sum(n.endswith(".lora_A.weight") for n in names) == sum(n.endswith(".lora_B.weight") for n in names)


def test_what_vllm_refuses_is_caught(adapter, tmp_path):
    import shutil

    changed = tmp_path / "adapter"
    shutil.copytree(adapter, changed)
    config = json.loads((changed / "adapter_config.json").read_text())
    (changed / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True, "r": 64,
                                                             "modules_to_save": ["lm_head"]}))
    problems = vllm_problems(changed)
    assert any("use_dora" in p for p in problems) and any("modules_to_save" in p for p in problems)
    assert any("--max-lora-rank" in p for p in problems) and any("rank r=64" in p for p in problems)
