"""KTO: the loss and its reference point against a slow reference, the paper's rule for imbalanced
thumbs, unpaired data in every shape (bad rows named with file, line and column), the row's
log-probabilities against plain forward passes, the first step's loss, and runs that learn (LoRA and
full fine-tuning)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import cli_fails, preference_rows, unpaired_rows, write_config, write_jsonl
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.data.format import IGNORE
from tunesmith.data.options import DataConfig
from tunesmith.data.pipeline import load_splits, resolve_data_path
from tunesmith.errors import TunesmithError
from tunesmith.objectives.dpo import pair_logps
from tunesmith.objectives.kto import balanced_weights, mismatched_partners, weight_advice, weight_ratio
from tunesmith.objectives.preference_losses import kto_loss, kto_reference_point
from tunesmith.recipe import run_training
from tunesmith.session import Session


def _slow_kto(policy, reference, desirable, mismatched_policy, mismatched_reference, beta, lam_d, lam_u):
    """Ethayarajh et al. 2024, eq. 7 with the KL estimate of section 4.1, one answer at a time."""
    n = len(mismatched_policy)
    z = max(0.0, sum(p - r for p, r in zip(mismatched_policy, mismatched_reference)) / n)
    out = []
    for p, r, good in zip(policy, reference, desirable):
        reward = p - r
        value = 1 / (1 + math.exp(-beta * (reward - z))) if good else 1 / (1 + math.exp(-beta * (z - reward)))
        out.append((lam_d if good else lam_u) * (1 - value))
    return out, z


@pytest.mark.parametrize("shift", [0.0, 25.0])  # the mismatched pairs' mean log-ratio below 0 (clamped) or above
@pytest.mark.parametrize("weights", [(1.0, 1.0), (3.0, 0.5)])
def test_kto_loss_matches_a_slow_reference(shift, weights):
    g = torch.Generator().manual_seed(0)
    policy, reference, mismatched_policy, mismatched_reference = -torch.rand(4, 12, generator=g,
                                                                              dtype=torch.float64) * 40
    mismatched_policy = mismatched_policy + shift - 20
    desirable = torch.rand(12, generator=g) < 0.4
    point = kto_reference_point(mismatched_policy, mismatched_reference)
    got = kto_loss(policy, reference, desirable, point, 0.3, *weights)
    want, z = _slow_kto(policy.tolist(), reference.tolist(), desirable.tolist(), mismatched_policy.tolist(),
                        mismatched_reference.tolist(), 0.3, *weights)
    assert float(point) == pytest.approx(z, abs=1e-12) and (z == 0) == (shift == 0)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


def test_no_gradient_flows_through_the_reference_point():
    mismatched = torch.tensor([5.0, 7.0], requires_grad=True)
    policy = torch.tensor([1.0, 2.0], requires_grad=True)
    point = kto_reference_point(mismatched, torch.zeros(2))
    kto_loss(policy, torch.zeros(2), torch.tensor([True, False]), point, 0.1).sum().backward()
    assert mismatched.grad is None and policy.grad.abs().sum() > 0


def test_the_papers_rule_for_imbalanced_thumbs():
    # 10 good, 30 bad: good answers weigh a third of what bad ones do; the paper wants [1, 4/3].
    assert weight_ratio(10, 30, 1.0, 1.0) == pytest.approx(1 / 3)
    assert "set objective.desirable_weight between 3 and 4" in weight_advice(10, 30, 1.0, 1.0)
    assert balanced_weights(10, 30, 1.0, 1.0) == (3.0, 1.0)
    assert weight_advice(10, 30, 3.5, 1.0) is None and weight_advice(10, 30, 4.0, 1.0) is None
    # 30 good, 10 bad: the bad answers are weighted up instead.
    assert "set objective.undesirable_weight between 2.25 and 3" in weight_advice(30, 10, 1.0, 1.0)
    assert balanced_weights(30, 10, 1.0, 1.0) == (1.0, 3.0)
    for good, bad in ((7, 50), (50, 7), (20, 20)):
        assert weight_ratio(good, bad, *balanced_weights(good, bad, 1.0, 2.0)) == pytest.approx(1.0)
    assert weight_advice(20, 0, 1.0, 1.0) == "the training split has no bad answers"
    assert balanced_weights(20, 0, 1.0, 1.0) == (1.0, 1.0)


def test_mismatched_partners_have_another_prompt_where_there_is_one():
    prompts = ["a", "a", "a", "b", "c", "c"]
    partners = mismatched_partners(prompts, seed=0)
    assert all(prompts[j] != prompts[i] for i, j in enumerate(partners))
    assert mismatched_partners(prompts, seed=0) == partners
    assert mismatched_partners(["x", "x"], seed=0) == [1, 0] and mismatched_partners(["x"], seed=0) == [0]


ROWS = [{"prompt": f"review film {i}", "completion": f"a {'great' if i % 3 else 'dull'} film {i}",
         "label": i % 3 != 0} for i in range(12)]


def _load(tmp_path, rows, name="answers.jsonl", **data):
    path = write_jsonl(tmp_path / name, rows)
    return load_splits(DataConfig(path=str(path), split={"validation": 0.0, "test": 0.0}, **data))


def _answers(splits):
    return sorted((e["messages"][-1]["content"], e["completion"], e["desirable"]) for e in splits["train"])


def test_unpaired_answers_are_read_alike_whatever_the_mark_and_shape(tmp_path):
    plain, schema, stats = _load(tmp_path, ROWS)
    assert schema.kind == "unpaired_preference" and schema.columns["desirable"] == "label"
    assert stats["answers"]["train"] == {"good": 8, "bad": 4}
    marks = [("up", "down"), ("thumbs_up", "thumbs_down"), ("\N{THUMBS UP SIGN}", "\N{THUMBS DOWN SIGN}"),
             (1, 0), (1, -1), ("True", "false"), ("good", "bad")]
    for up, down in marks:
        rows = [{**r, "label": up if r["label"] else down} for r in ROWS]
        assert _answers(_load(tmp_path, rows)[0]) == _answers(plain), (up, down)
    chat = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r["completion"]}], "thumbs": r["label"]} for r in ROWS]
    assert _answers(_load(tmp_path, chat)[0]) == _answers(plain)
    csv = tmp_path / "answers.csv"
    csv.write_text("question,answer,good\n" + "".join(f'{r["prompt"]},{r["completion"]},{str(r["label"]).lower()}\n'
                                                       for r in ROWS))
    splits, schema, _ = load_splits(DataConfig(path=str(csv), split={"validation": 0.0, "test": 0.0},
                                               columns={"desirable": "good"}))
    assert schema.kind == "unpaired_preference" and _answers(splits) == _answers(plain)


def test_bad_marks_are_reported_together_with_file_line_and_column(tmp_path):
    rows = [*ROWS[:3], {**ROWS[3], "label": "maybe"}, *ROWS[4:6], {**ROWS[6], "label": 5}]
    with pytest.raises(TunesmithError) as err:
        _load(tmp_path, rows)
    assert [p.split(": column")[0] for p in err.value.problems] == [f"{tmp_path}/answers.jsonl:4",
                                                                   f"{tmp_path}/answers.jsonl:7"]
    assert "column 'label' must say whether the answer is good" in err.value.problems[0]
    assert err.value.problems[0].endswith("found 'maybe'")


def test_a_missing_column_is_one_line_naming_file_and_column(tmp_path, tiny_model_dir, capsys):
    path = write_jsonl(tmp_path / "answers.jsonl", [{"prompt": r["prompt"], "completion": r["completion"]} for r in ROWS])
    data = {"path": str(path), "format": "unpaired_preference"}
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, data, objective={"name": "kto"})
    err = cli_fails(capsys, ["data", "inspect", str(config)], "answers.jsonl: no column 'desirable' for desirable "
                    "(unpaired_preference data); columns found: prompt, completion")
    assert len(err.strip().splitlines()) == 1


def test_kto_refuses_other_data_methods_and_canaries(tmp_path, tiny_model_dir, capsys):
    pairs = {"path": str(write_jsonl(tmp_path / "pairs.jsonl", preference_rows(10)))}
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, pairs, objective={"name": "kto"})
    cli_fails(capsys, ["data", "inspect", str(config)], "objective kto needs unpaired preference data",
              "preference pairs train objective dpo")
    answers = {"path": str(write_jsonl(tmp_path / "answers.jsonl", ROWS))}
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, answers, objective={"name": "causal"})
    cli_fails(capsys, ["data", "inspect", str(config)], "use objective.name: kto")
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, answers, objective={"name": "kto"},
                          method={"name": "prompt"})
    cli_fails(capsys, ["train", str(config)], "method.name: prompt cannot train objective kto")
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, {**answers, "canaries": {"count": 1}},
                          objective={"name": "kto"})
    cli_fails(capsys, ["data", "inspect", str(config)], "data.canaries: canaries are measured on causal LMs only")


def test_builtin_rotten_tomatoes_thumbs_are_unpaired_and_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    path = resolve_data_path("builtin:rotten_tomatoes_thumbs")
    rows = [json.loads(line) for line in open(path)]
    pairs = [json.loads(line) for line in open(resolve_data_path("builtin:rotten_tomatoes_pairs"))]
    assert len(rows) == len(pairs) and len({r["film"] for r in rows}) == len(rows)
    assert [r["label"] for r in rows[:4]] == [True, False, True, False]
    assert [r["completion"] for r in rows[:2]] == [pairs[0]["chosen"], pairs[1]["rejected"]]


def _session(tmp_path, model_dir, rows, method=None, **objective):
    data = {"path": str(write_jsonl(tmp_path / "answers.jsonl", rows)), "max_length": 96,
            "split": {"validation": 0.0, "test": 0.0}}
    path = write_config(tmp_path / "c.yaml", model_dir, data, objective={"name": "kto", **objective},
                        **({"method": method} if method else {}))
    session = Session(load_config(path))
    session.prepare()
    return session


def _slow_logp(model, ids: list[int], labels: list[int]) -> float:
    logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), -1)
    return sum(float(logprobs[t - 1, labels[t]]) for t in range(1, len(ids)) if labels[t] != IGNORE)


@torch.no_grad()
def test_a_row_scores_the_answer_and_its_mismatched_pair_as_plain_forward_passes(tmp_path, tiny_model_dir):
    # A chat prompt with an earlier assistant turn: only the last answer is trained.
    rows = [{"prompt": [{"role": "user", "content": f"review film {i}"}, {"role": "assistant", "content": "which?"},
                        {"role": "user", "content": f"the {i} one"}],
             "completion": f"a {'great' if i % 2 else 'dull'} film" + " indeed" * (i % 3), "label": bool(i % 2)}
            for i in range(8)]
    session = _session(tmp_path, tiny_model_dir, rows)
    model = session.load_model([]).eval()
    examples, items = session.data.examples["train"], session.data.encoded["train"]
    batches = session.objective.batches(items)
    got = pair_logps(model, batches.tensors(list(range(8))))
    tok = session.tokenizer
    for i, item in enumerate(items):
        other = next(e for e in examples if e["completion"] == tok.decode(
            [t for t, label in zip(item["mismatched"]["input_ids"], item["mismatched"]["labels"]) if label != IGNORE],
            skip_special_tokens=True))
        assert other["_input"] != examples[i]["_input"]  # a mismatched pair: another example's completion
        trained = tok.decode([t for t, label in zip(item["answer"]["input_ids"], item["answer"]["labels"])
                              if label != IGNORE], skip_special_tokens=True)
        assert trained == examples[i]["completion"]  # "which?" of the prompt is not trained
        want = [_slow_logp(model, item[k]["input_ids"], item[k]["labels"]) for k in ("answer", "mismatched")]
        torch.testing.assert_close(got[i].double(), torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}, {"name": "full"}])
def test_the_first_step_is_half_the_weight_of_each_answer(tmp_path, tiny_model_dir, method):
    # The policy is the reference: every log-ratio and the reference point are 0, and 1 - sigmoid(0) = 1/2.
    session = _session(tmp_path, tiny_model_dir, unpaired_rows(24), method, desirable_weight=3.0)
    model = session.method.apply(session.load_model([]), session.config.method)
    batches = session.objective.batches(session.data.encoded["train"])
    batch = batches.tensors(batches.epoch(0)[0])
    losses = batches.scored(model, batch)[0]
    assert losses.requires_grad
    torch.testing.assert_close(losses.detach(), torch.where(batch["desirable"], 1.5, 0.5))


def test_the_weights_are_balanced_or_the_data_statistics_warn(tmp_path, tiny_model_dir, capsys):
    rows = unpaired_rows(40, good_every=4)  # 10 good, 30 bad
    data = {"path": str(write_jsonl(tmp_path / "answers.jsonl", rows)), "split": {"validation": 0.0, "test": 0.0}}
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, data, objective={"name": "kto"})
    assert main(["data", "inspect", str(config)]) == 0
    out = capsys.readouterr().out
    assert "answers train: 10 good, 30 bad" in out
    assert ("kto weights: desirable 1, undesirable 1 (as given, on 10 good and 30 bad training answers); warning: "
            "desirable_weight * good / (undesirable_weight * bad) = 0.33, outside the paper's [1, 4/3]: set "
            "objective.desirable_weight between 3 and 4, or objective.balance: auto") in out
    assert main(["data", "inspect", str(config), "--set", "objective.balance=auto"]) == 0
    out = capsys.readouterr().out
    assert "kto weights: desirable 3, undesirable 1 (balanced, on 10 good and 30 bad training answers)\n" in out


@pytest.mark.parametrize("method", [{"name": "lora", "r": 8, "alpha": 16}, {"name": "full"}])
def test_a_run_learns_and_every_trainable_parameter_changes(tmp_path, tiny_model_dir, unpaired_data, method,
                                                           monkeypatch):
    from tunesmith import recipe

    start = {}

    def fit(model, *args, **kwargs):  # the trainable parameters as training starts
        start.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return real_fit(model, *args, **kwargs)

    real_fit = recipe.fit
    monkeypatch.setattr(recipe, "fit", fit)
    lr = 0.02 if method["name"] == "lora" else 0.001
    path = write_config(tmp_path / "c.yaml", tiny_model_dir, unpaired_data, objective={"name": "kto"}, method=method,
                        train={"max_steps": 16, "lr": lr, "eval_every": 8, "mixed_precision": "no"})
    run_training(load_config(path))
    run = tmp_path / "run"
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[0] == pytest.approx(0.5) and sum(losses[-4:]) < sum(losses[:4])
    metrics = json.loads((run / "metrics.json").read_text())
    base, tuned = metrics["base"], metrics["tuned"]
    assert base == {"loss": 0.5, "accuracy": 0.0, "kl": 0.0, "desirable_reward": 0.0, "undesirable_reward": 0.0,
                    "reward_margin": 0.0}
    assert tuned["loss"] < base["loss"] and tuned["reward_margin"] > 0 and tuned["accuracy"] > 0.5

    changed = {n: p for n, p in model_after(run).items() if n in start}
    assert len(changed) == len(start) > 0
    unchanged = [n for n, p in changed.items() if torch.equal(p, start[n])]
    assert not unchanged, unchanged


def model_after(run) -> dict[str, torch.Tensor]:
    """The trained run's parameters, by the names they had in training."""
    from tunesmith.session import load_run

    return {n: p.detach() for n, p in load_run(run)[2].named_parameters()}


@torch.no_grad()
def test_a_model_scored_beside_its_unchanged_base_gets_the_bases_reference(tmp_path, tiny_model_dir):
    """Full fine-tuning scored after training (retrain's gate): the base, loaded and kept unchanged
    beside the tuned model, gives the reference, with no copy of it loaded again."""
    import copy

    session = _session(tmp_path, tiny_model_dir, unpaired_rows(8), {"name": "full"})
    items = session.data.encoded["train"]
    base = session.load_model([]).eval()
    tuned = copy.deepcopy(base)
    for p in tuned.parameters():
        p.add_(0.05)

    def no_reload():
        raise AssertionError("the base was loaded again")

    session.objective.reference.reload = no_reload
    batches = session.objective.batches(items)
    policy, reference = batches.logps(tuned, batches.tensors(list(range(len(items)))))
    want = torch.tensor([[_slow_logp(base, item[k]["input_ids"], item[k]["labels"]) for k in ("answer", "mismatched")]
                         for item in items], dtype=torch.float32)
    torch.testing.assert_close(reference, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(policy, want, atol=1e-2)


@pytest.mark.parametrize("objective", ["kto", "dpo"])
def test_eval_data_scores_a_full_fine_tuned_run_against_its_base(objective, tmp_path, tiny_model_dir, capsys):
    """`tunesmith eval RUN --data FILE` on full fine-tuning: a new file's answers are scored against the
    base model (loaded once, beside the tuned one), as the run's own held-out answers were."""
    rows, more = (unpaired_rows(30), unpaired_rows(8, seed=5)) if objective == "kto" else \
        (preference_rows(30), preference_rows(8, seed=5))
    data = {"path": str(write_jsonl(tmp_path / "rows.jsonl", rows)), "max_length": 96,
            "split": {"validation": 0.1, "test": 0.1}}
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, data, objective={"name": objective},
                          method={"name": "full"}, train={"max_steps": 2, "lr": 0.001, "eval_every": 100})
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--data", str(write_jsonl(tmp_path / "new.jsonl", more))]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["base"]["loss"] == pytest.approx(0.5 if objective == "kto" else math.log(2), abs=1e-6)
    assert scores["tuned"]["loss"] != scores["base"]["loss"]
