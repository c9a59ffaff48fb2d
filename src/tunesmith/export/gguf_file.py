"""Write a merged Llama-architecture model as a GGUF file, the way llama.cpp's own converter does.

Tensor names come from the ``gguf`` package's map; the query and key projections are permuted into
llama.cpp's rotary layout (transformers' GGUF loader permutes them back); the tokenizer (byte-level
BPE, as SmolLM2 and most Llama-family models use) goes in as tokens, types and merges, with the
special tokens and chat template. Norms and other 1-D tensors stay float32 in every file type, as
llama.cpp expects.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from tunesmith.errors import TunesmithError

SUPPORTED = ("llama",)
FILE_TYPES = {"float32": 0, "float16": 1}  # gguf.LlamaFileType.ALL_F32, MOSTLY_F16


def permute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """Interleave each head's rotary halves (HF's layout) into llama.cpp's pairs layout."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def check_exportable(model) -> None:
    config = model.config
    if config.model_type not in SUPPORTED or not type(model).__name__.endswith("ForCausalLM"):
        raise TunesmithError(
            f"--format gguf: exports causal Llama-architecture models; this run's model is "
            f"{type(model).__name__} ({config.model_type}); use --format hf")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise TunesmithError(f"--format gguf: rope scaling {rope.get('rope_type')!r} is not exported; use --format hf")


def gguf_tensors(model) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every weight, in the model's order, tied weights once."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    out = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # the loader ties the output head to token_embd when output.weight is absent
        stem, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(stem)
        if name is None:
            raise TunesmithError(f"--format gguf: no GGUF name for tensor {hf_name}")
        array = tensor.detach().to(torch.float32).cpu().numpy()
        if name.endswith(".attn_q"):
            array = permute_rotary(array, config.num_attention_heads)
        elif name.endswith(".attn_k"):
            array = permute_rotary(array, config.num_key_value_heads)
        out.append((f"{name}.{suffix}", array))
    return out


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        try:
            vocab = gguf.vocab.BpeVocab(Path(tmp))
        except (FileNotFoundError, ValueError):
            raise TunesmithError("--format gguf: only byte-level BPE tokenizers (GPT-2 style) are "
                                 "exported; use --format hf") from None
        spelled = json.loads((Path(tmp) / "tokenizer.json").read_text())
        special = {t["content"] for t in spelled.get("added_tokens", []) if t.get("special")}
        tokens, types = [], []
        for text, _, kind in vocab.all_tokens():
            tokens.append(text)
            decoded = text.decode("utf-8") if isinstance(text, bytes) else text
            types.append(gguf.TokenType.CONTROL if decoded in special else kind)
        # Embedding rows beyond the tokenizer's vocabulary get placeholder tokens, as llama.cpp's
        # converter writes them: the file's token count must match the embedding's rows.
        for i in range(len(tokens), vocab_size):
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("gpt2")
        # "default": GPT-2's split, which is what a plain ByteLevel pre-tokenizer applies.
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.SpecialVocab(Path(tmp), load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def write_gguf(model, tokenizer, path: Path, dtype: str = "float32") -> Path:
    """Write ``model`` (a merged ``LlamaForCausalLM``) and ``tokenizer`` to the GGUF file ``path``."""
    import gguf

    if dtype not in FILE_TYPES:
        raise TunesmithError(f"--dtype {dtype!r}: expected one of {', '.join(FILE_TYPES)}")
    check_exportable(model)
    config = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(Path(str(getattr(config, "_name_or_path", "") or "model")).name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(FILE_TYPES[dtype])
    add_tokenizer(writer, tokenizer, config.vocab_size)
    for name, array in gguf_tensors(model):
        if dtype == "float16" and array.ndim > 1:
            array = array.astype(np.float16)
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
