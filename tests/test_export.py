"""``tunesmith export``: the merged model as a plain Hugging Face directory and as a GGUF file that
transformers' own GGUF loader reads back with the same logits."""

from __future__ import annotations

import pytest
import torch

from conftest import cli_fails, review_rows, write_config, write_jsonl
from tunesmith.cli import main
from tunesmith.errors import TunesmithError
from tunesmith.export.gguf_file import check_exportable
from tunesmith.export.output import merged_model
from tunesmith.session import load_run

TEXTS = ["honestly the film is great, unlike the plot", "a dull movie with many parts"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("export")
    data = write_jsonl(tmp / "reviews.jsonl", review_rows(60))
    section = {"path": str(data), "format": "classification", "columns": {"text": "review", "label": "sentiment"},
               "instruction": "classify sentiment: {text}", "max_length": 64}
    config = write_config(tmp / "c.yaml", tiny_model_dir, section, train={"max_steps": 4, "eval_every": 100},
                          output={"dir": str(tmp / "run")})
    assert main(["train", str(config)]) == 0
    return tmp / "run"


def _logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def tuned(lora_run):
    _, session, model = load_run(lora_run)
    with model.disable_adapter():
        base = _logits(model, session.tokenizer)
    logits = _logits(model, session.tokenizer)
    assert (logits - base).abs().max() > 1e-3  # the adapter changed the model: the export must carry it
    return session.tokenizer, logits


def test_hf_export_loads_with_transformers_alone(lora_run, tuned, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    expected = tuned[1]
    out = tmp_path / "hf"
    assert main(["export", str(lora_run), "--format", "hf", "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    # Merged against unmerged: the sums run in another order (see below), by 1.4e-5 on an AMX CPU.
    torch.testing.assert_close(_logits(model, AutoTokenizer.from_pretrained(out)), expected, atol=1e-4, rtol=0)


# The reference is the unmerged model (base + LoRA): merging changes the order of the sums, so float32
# agrees to 1e-4 on logits of size ~5; float16 rounds every matrix once (5e-2).
@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-4), ("float16", 5e-2)])
def test_gguf_round_trip_through_transformers_gguf_loader(lora_run, tuned, tmp_path, dtype, tolerance):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, expected = tuned
    out = tmp_path / "model.gguf"
    assert main(["export", str(lora_run), "--format", "gguf", "--out", str(out), "--dtype", dtype]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    torch.testing.assert_close(_logits(model, tokenizer), expected, atol=tolerance, rtol=0)
    if dtype == "float32":  # and the weights are the merged weights, bit for bit
        merged = merged_model(lora_run)[0].state_dict()
        read = model.state_dict()
        assert read.keys() == merged.keys()
        assert all(torch.equal(read[k], merged[k]) for k in merged)
    # The tokenizer inside the file splits text as the run's own does, special tokens included.
    read_back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": TEXTS[0]}], tokenize=False)
    for text in [*TEXTS, chat]:
        assert read_back(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_export_never_overwrites(lora_run, tmp_path, capsys):
    existing = tmp_path / "model.gguf"
    existing.write_text("mine")
    cli_fails(capsys, ["export", str(lora_run), "--format", "gguf", "--out", str(existing)], "already exists")
    assert existing.read_text() == "mine"
    (tmp_path / "hf").mkdir()
    cli_fails(capsys, ["export", str(lora_run), "--format", "hf", "--out", str(tmp_path / "hf")], "already exists")
    assert sorted(tmp_path.iterdir()) == sorted([existing, tmp_path / "hf"])  # no partial output left


def test_gguf_refuses_a_classifier(tiny_bert_dir):
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    with pytest.raises(TunesmithError, match="use --format hf"):
        check_exportable(model)


def test_export_of_a_missing_run_is_one_line(tmp_path, capsys):
    cli_fails(capsys, ["export", str(tmp_path / "nope"), "--format", "hf", "--out", str(tmp_path / "o")],
              "not a tunesmith run directory")


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tolerance", [("float32", 0.0), ("float16", 0.1)])
def test_smollm2_gguf_round_trip(tmp_path, dtype, tolerance):
    """The bundled SmolLM2 (no training: the GGUF writer on its real shapes, vocabulary and chat
    template). Prints the figures docs/serving.md quotes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.export.gguf_file import write_gguf
    from tunesmith.model import load_tokenizer, resolve_model

    source = resolve_model("smollm2-135m")
    tokenizer = load_tokenizer(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    path = write_gguf(model, tokenizer, tmp_path / "smollm2.gguf", dtype)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    read_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    texts = ["A gripping, beautifully acted film.", "Something is rotten in the state of Denmark.",
             tokenizer.apply_chat_template([{"role": "user", "content": "Hello 2026!"}], tokenize=False,
                                           add_generation_prompt=True)]
    worst = 0.0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert read_tokenizer(text)["input_ids"] == ids
        with torch.no_grad():
            worst = max(worst, (model(torch.tensor([ids])).logits - back(torch.tensor([ids])).logits).abs().max().item())
    print(f"{dtype}: {path.stat().st_size / 2**20:.0f} MiB, max |logit difference| {worst:.3g}")
    assert worst <= tolerance
