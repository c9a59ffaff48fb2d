"""Methods say how their runs are served (``Method.serves``) and merged (``Method.merges``): DoRA and
IA3 adapters are served beside LoRA ones on one base, each in batches of its own (IA3 on its own copy
of the base), and each answers as it does alone in PEFT; a method that is not served beside others is
refused, naming it; DoRA does not merge."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from conftest import review_rows, write_config, write_jsonl
from test_serve import wait_for_submitted
from tunesmith.errors import TunesmithError
from tunesmith.methods import REGISTRY
from tunesmith.methods.base import ALONE, APART, MIXED
from tunesmith.serve.engine import BASE
from tunesmith.serve.options import ServeOptions
from tunesmith.serve.server import build_server
from tunesmith.store import Run

PROMPTS = {"lora": "honestly the film is", "dora": "a dull boring story", "ia3": "a great cast", BASE: "the plot"}


def adapter_run(root, model_dir, name: str, seed: int, use_dora: bool = False):
    """A complete run whose adapter is LoRA, DoRA or (``name`` ia3) IA3, with random weights saved by PEFT
    (none of them the identity)."""
    from peft import IA3Config, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run_dir = root / name
    data = write_jsonl(root / f"{name}.jsonl", review_rows(20))
    method = {"name": "ia3"} if name == "ia3" else {"name": "lora", "use_dora": use_dora}
    config = write_config(root / f"{name}.yaml", model_dir, {"path": str(data), "format": "classification",
                          "columns": {"text": "review", "label": "sentiment"}},
                          method=method, output={"dir": str(run_dir)})
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(config.read_text())
    torch.manual_seed(seed)
    peft_config = IA3Config(init_ia3_weights=False) if name == "ia3" else \
        LoraConfig(r=4, lora_alpha=32, target_modules="all-linear", init_lora_weights=False, use_dora=use_dora)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), peft_config)
    if name == "ia3":  # PEFT's random vectors stay near 1: scale them well away from the base
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "ia3_l" in n:
                    p.mul_(3.0)
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
    assert lora.serves(lora.options()) == MIXED and lora.merges(lora.options()).hows == ("linear", "ties",
                                                                                         "dare_ties", "svd")
    dora = lora.options(use_dora=True)
    assert lora.serves(dora) == ALONE and lora.merges(dora) is None
    ia3 = REGISTRY["ia3"]
    assert ia3.serves(ia3.options()) == APART and ia3.merges(ia3.options()).hows == ("linear",)
    for name in ("full", "prefix", "prompt", "ptuning", "adapter", "qlora"):
        method = REGISTRY[name]
        assert method.serves(method.options()) is None and method.merges(method.options()) is None


def test_ppo_and_grpo_refuse_at_config_load_a_method_whose_adapter_cannot_be_disabled(tmp_path, tiny_model_dir):
    from test_align_grpo_run import grpo_config
    from tunesmith.align.options import load_grpo_config

    raw = grpo_config(tmp_path, tiny_model_dir)
    assert load_grpo_config(tmp_path / "grpo.yaml", raw=raw).method.name == "lora"
    with pytest.raises(TunesmithError, match="method.name: GRPO needs a method whose adapter can be disabled "
                                             r"\(the reference model; Method.disables\), such as lora; full has none"):
        load_grpo_config(tmp_path / "grpo.yaml", raw={**raw, "method": {"name": "full"}})


def test_dora_and_ia3_adapters_are_served_beside_lora_ones_in_batches_of_their_own(tmp_path, tiny_model_dir):
    from openai import OpenAI

    runs = {"lora": adapter_run(tmp_path, tiny_model_dir, "lora", seed=1),
            "dora": adapter_run(tmp_path, tiny_model_dir, "dora", seed=2, use_dora=True),
            "ia3": adapter_run(tmp_path, tiny_model_dir, "ia3", seed=3)}
    server = build_server(runs, options=ServeOptions(batch_window_ms=50, max_tokens=8), log_requests=False)
    pool = server.pool
    jobs = [SimpleNamespace(adapter=a) for a in ("lora", "dora", "ia3", BASE, "dora", "lora")]
    lanes = [pool.place(job) for job in jobs]
    assert [key for key, _, _ in lanes] == [BASE, "dora", "ia3", BASE, "dora", BASE]
    assert [model for _, model, _ in lanes] == [pool.model, pool.model, pool.apart["ia3"], pool.model, pool.model,
                                                pool.model]
    base = str(tiny_model_dir)
    expected = {name: alone_in_peft(runs.get(name), tiny_model_dir, PROMPTS[name], 6) for name in PROMPTS}
    assert len(set(expected.values())) == 4  # four models, four answers
    with server.in_thread() as url:
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert {m.id for m in client.models.list().data} == {"lora", "dora", "ia3", base}

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
        assert sorted(server.scheduler.batches[-1]) == sorted(["lora", "dora", "ia3", BASE])
        pool.unload("ia3")  # its own model goes with it; the others still answer
        assert "ia3" not in pool.apart and ask("lora") == expected["lora"]


def test_a_method_not_served_beside_others_is_refused_naming_it(tmp_path, tiny_model_dir):
    run = adapter_run(tmp_path, tiny_model_dir, "lora", seed=1)
    config = (run / "config.yaml").read_text().replace("name: lora", "name: full")
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.yaml").write_text("\n".join(line for line in config.splitlines() if not line.strip().startswith(
        ("r:", "alpha:", "dropout:", "use_dora:", "use_rslora:", "target_modules:"))))
    with pytest.raises(TunesmithError, match="method full, which is not served beside other runs"):
        build_server({"lora": run, "full": full}, log_requests=False)
