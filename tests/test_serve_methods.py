"""Methods say how their runs are served (``Method.serves``) and merged (``Method.combines``): a DoRA
adapter is served beside LoRA ones on one base, in a batch of its own, and answers as it does alone
in PEFT; a method that is not served on a shared base is refused, naming it; DoRA does not merge."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from conftest import review_rows, write_config, write_jsonl
from test_serve import wait_for_submitted
from tunesmith.errors import TunesmithError
from tunesmith.methods import REGISTRY
from tunesmith.methods.base import ALONE, MIXED
from tunesmith.serve.engine import BASE
from tunesmith.serve.options import ServeOptions
from tunesmith.serve.server import build_server
from tunesmith.store import Run

PROMPTS = {"lora": "honestly the film is", "dora": "a dull boring story", BASE: "the plot"}


def adapter_run(root, model_dir, name: str, seed: int, use_dora: bool = False):
    """A complete run whose adapter is LoRA (or DoRA) with random, non-zero weights saved by PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run_dir = root / name
    data = write_jsonl(root / f"{name}.jsonl", review_rows(20))
    config = write_config(root / f"{name}.yaml", model_dir, {"path": str(data), "format": "classification",
                          "columns": {"text": "review", "label": "sentiment"}},
                          method={"name": "lora", "use_dora": use_dora}, output={"dir": str(run_dir)})
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(config.read_text())
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=32, target_modules="all-linear", init_lora_weights=False,
                                      use_dora=use_dora))
    model.save_pretrained(run_dir / "adapter")
    Run(run_dir).set_status("complete")
    return run_dir


def alone_in_peft(run_dir, model_dir, prompt: str, tokens: int) -> str:
    """Greedy decoding by PEFT and transformers with the run's adapter as the only one."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if run_dir is not None:
        model = PeftModel.from_pretrained(model, run_dir / "adapter")
    ids = tokenizer(prompt).input_ids
    with torch.no_grad():
        out = model.eval().generate(input_ids=torch.tensor([ids]), max_new_tokens=tokens, min_new_tokens=tokens,
                                    do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_each_method_says_how_it_is_served_and_merged():
    lora = REGISTRY["lora"]
    assert lora.serves(lora.options()) == MIXED and lora.combines(lora.options())
    dora = lora.options(use_dora=True)
    assert lora.serves(dora) == ALONE and not lora.combines(dora)
    for name in ("full", "prefix", "prompt", "ptuning", "adapter", "qlora", "ia3"):
        method = REGISTRY[name]
        assert method.serves(method.options()) is None and not method.combines(method.options())


def test_a_dora_adapter_is_served_beside_lora_ones_in_a_batch_of_its_own(tmp_path, tiny_model_dir):
    from openai import OpenAI

    runs = {"lora": adapter_run(tmp_path, tiny_model_dir, "lora", seed=1),
            "dora": adapter_run(tmp_path, tiny_model_dir, "dora", seed=2, use_dora=True)}
    server = build_server(runs, options=ServeOptions(batch_window_ms=50, max_tokens=8), log_requests=False)
    pool = server.pool
    jobs = [SimpleNamespace(adapter=a) for a in ("lora", "dora", BASE, "dora", "lora")]
    assert [[j.adapter for j in batch] for batch in pool.batches(jobs)] == [["lora", BASE, "lora"], ["dora", "dora"]]
    base = str(tiny_model_dir)
    expected = {name: alone_in_peft(runs.get(name), tiny_model_dir, PROMPTS[name], 6) for name in PROMPTS}
    assert len(set(expected.values())) == 3  # three models, three answers
    with server.in_thread() as url:
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert {m.id for m in client.models.list().data} == {"lora", "dora", base}

        def ask(name: str) -> str:
            out = client.completions.create(model=base if name == BASE else name, prompt=PROMPTS[name],
                                            max_tokens=6, temperature=0)
            return out.choices[0].text

        assert {name: ask(name) for name in PROMPTS} == expected
        together: dict[str, str] = {}
        threads = [threading.Thread(target=lambda n=n: together.__setitem__(n, ask(n))) for n in PROMPTS]
        with server.scheduler.paused():  # every request queues, then all go as one scheduler batch
            wait_for_submitted(server, len(PROMPTS), threads)
        for thread in threads:
            thread.join()
        assert together == expected
        assert sorted(server.scheduler.batches[-1]) == sorted(["lora", "dora", BASE])


def test_a_method_not_served_on_a_shared_base_is_refused_naming_it(tmp_path, tiny_model_dir):
    run = adapter_run(tmp_path, tiny_model_dir, "lora", seed=1)
    config = (run / "config.yaml").read_text().replace("name: lora", "name: ia3")
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "config.yaml").write_text("\n".join(line for line in config.splitlines()
                                               if not line.strip().startswith(("r:", "alpha:", "dropout:", "use_dora:"))))
    with pytest.raises(TunesmithError, match="method ia3, which is not served on a shared base model"):
        build_server({"lora": run, "ia3": ia3}, log_requests=False)
