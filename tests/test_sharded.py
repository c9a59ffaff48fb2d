"""Sharded training that finishes: two CPU processes over gloo, with the FSDP settings of
examples/accelerate/fsdp.yaml, or with DeepSpeed ZeRO-2 or ZeRO-3 as
examples/accelerate/deepspeed_zero2.yaml and deepspeed_zero3.yaml set it (when DeepSpeed is
installed), stopped by SIGTERM and resumed from their checkpoint, give the losses, saved weights and
test metrics of one process that trains on both shares of every step.

accelerate switches FSDP and DeepSpeed on only for GPU-like devices, so the processes run through
tests/shard_on_cpu.py, which turns accelerate's CPU state to the engine asked for (see its docstring).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import launch as accelerate_launch
from safetensors.torch import load_file
from test_accelerate_configs import CONFIG_DIR, ROOT, launch_args

from conftest import cli_fails, free_port, write_config
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.recipe import run_training
from tunesmith.train import zero
from tunesmith.train.checkpoint import load_checkpoint, save_checkpoint

STEPS = 4
LAUNCHER = Path(__file__).parent / "shard_on_cpu.py"


def launch_env(monkeypatch, name: str) -> dict[str, str]:
    """The FSDP or DeepSpeed part of the environment `accelerate launch` gives each process for
    examples/accelerate/NAME."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(accelerate_launch, "is_port_in_use", lambda port: False)
    args = launch_args(CONFIG_DIR / name)
    env = accelerate_launch.prepare_deepspeed_cmd_env(args)[1] if args.use_deepspeed else \
        accelerate_launch.prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items()
            if k.startswith(("FSDP_", "ACCELERATE_USE_", "ACCELERATE_DEEPSPEED_", "ACCELERATE_GRADIENT_"))
            or k == "ACCELERATE_CONFIG_DS_FIELDS"}


def fsdp_env(monkeypatch) -> dict[str, str]:
    return launch_env(monkeypatch, "fsdp.yaml")


def two_processes(config: Path, env: dict[str, str], *args: str, launcher: tuple[str, ...] = (str(LAUNCHER),)
                  ) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(free_port()), *launcher, "train", str(config), *args]
    return subprocess.run(launch, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True,
                          text=True, timeout=300)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def config_file(tmp_path, tiny_model_dir, review_data):
    # No dropout: both runs draw nothing random.
    return write_config(tmp_path / "c.yaml", tiny_model_dir, review_data,
                        train={"max_steps": STEPS, "batch_tokens": 64, "eval_every": 2, "save_every": 2,
                               "threads": 1, "mixed_precision": "no", "lr": 0.05})


def test_fsdp_two_processes_stopped_and_resumed_match_one_process(tmp_path, config_file, monkeypatch):
    env = fsdp_env(monkeypatch)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    sharded = tmp_path / "sharded"
    out = f"output.dir={sharded}"

    stopped = two_processes(config_file, {**env, "SIGTERM_AT_STEP": "2"}, "--set", out)
    assert stopped.returncode != 0, stopped.stdout[-2000:]
    assert "sharded over 2 processes (FSDP2)" in stopped.stdout, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert json.loads((sharded / "status.json").read_text())["status"] == "interrupted"
    assert json.loads((sharded / "checkpoints" / "last" / "state.json").read_text())["step"] == 2
    assert not (sharded / "metrics.json").exists()

    resumed = two_processes(config_file, env, "--set", out, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert json.loads((sharded / "status.json").read_text())["status"] == "complete"

    one = tmp_path / "one"
    run_training(load_config(config_file, [f"output.dir={one}", "train.grad_accum=2"]))
    assert_same_as_one_process(sharded, one)


def assert_same_as_one_process(split: Path, one: Path) -> None:
    """A LoRA run on two processes logged, scored and saved what one process with both shares did."""
    log_split, log_one = _log(split), _log(one)
    assert [sorted(r) for r in log_split] == [sorted(r) for r in log_one]
    assert [r["step"] for r in log_split if "loss" in r] == list(range(1, STEPS + 1))
    for a, b in zip(log_split, log_one):
        for key in ("loss", "val_loss", "trained_tokens", "grad_norm", "lr"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4), (key, a, b)
    losses = [r["loss"] for r in log_one if "loss" in r]
    assert losses[-1] < losses[0]

    metrics_split, metrics_one = (json.loads((run / "metrics.json").read_text()) for run in (split, one))
    assert metrics_split["tuned"] == pytest.approx(metrics_one["tuned"], rel=1e-4)
    assert metrics_split["base"] == pytest.approx(metrics_one["base"], rel=1e-4)

    trained, reference = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (split, one))
    assert trained.keys() == reference.keys()
    for name, weight in reference.items():
        torch.testing.assert_close(trained[name], weight, rtol=1e-4, atol=1e-5, msg=name)
    assert all(w.abs().sum() > 0 for name, w in trained.items() if "lora_B" in name)  # B starts at zero


@pytest.mark.parametrize("stage, held", [
    (2, "optimizer state and gradients sharded over 2 processes (DeepSpeed ZeRO-2)"),
    (3, "parameters and optimizer state sharded over 2 processes (DeepSpeed ZeRO-3)"),
])
def test_deepspeed_two_processes_stopped_and_resumed_match_one_process(tmp_path, config_file, monkeypatch, stage,
                                                                       held):
    # ZeRO-3: validation, the checkpoints, the best weights and the tuned model gather the partitions.
    # Each process saves its own partition of ZeRO's optimizer state and resumes from it.
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: pip install 'tunesmith[deepspeed]'")
    env = launch_env(monkeypatch, f"deepspeed_zero{stage}.yaml")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
    zero, one = tmp_path / f"zero{stage}", tmp_path / "one"
    out = f"output.dir={zero}"

    stopped = two_processes(config_file, {**env, "SIGTERM_AT_STEP": "2"}, "--set", out)
    assert stopped.returncode != 0, stopped.stdout[-2000:]
    assert held in stopped.stdout, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    last = zero / "checkpoints" / "last"
    assert json.loads((last / "state.json").read_text())["step"] == 2
    assert torch.load(last / "optimizer.pt", weights_only=True)["zero"] == {"stage": stage, "processes": 2}
    partitions = [load_file(last / f"zero_rank{rank}.safetensors") for rank in (0, 1)]
    assert all(p.keys() == partitions[0].keys() and "state.0.exp_avg" in p for p in partitions)
    assert not torch.equal(partitions[0]["master.0"], partitions[1]["master.0"])  # each process's own part

    # Resumed on one process without DeepSpeed: refused, and the checkpoint is left as it was.
    with pytest.raises(TunesmithError, match=f"partitioned over 2 processes; this run is not under DeepSpeed, "
                                             f"on 1 process: resume it under DeepSpeed ZeRO-{stage} on 2 processes"):
        run_training(load_config(config_file, [out]), resume=True)
    assert json.loads((last / "state.json").read_text())["step"] == 2

    resumed = two_processes(config_file, env, "--set", out, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert json.loads((zero / "status.json").read_text())["status"] == "complete"
    run_training(load_config(config_file, [f"output.dir={one}", "train.grad_accum=2"]))
    assert_same_as_one_process(zero, one)
    checkpoint = load_file(last / "trainable.safetensors")
    torch.testing.assert_close(checkpoint, load_file(zero / "checkpoints" / "best.safetensors"))  # step 4 is best
    assert all(w.numel() > 0 for w in checkpoint.values())  # whole, not ZeRO-3's empty partitions


def test_full_fine_tuning_sharded_matches_one_process(tmp_path, tiny_model_dir, review_data, monkeypatch):
    # Every parameter sharded and trained, the tied embeddings included; saved whole under model/.
    config = write_config(tmp_path / "full.yaml", tiny_model_dir, review_data, method={"name": "full"},
                          train={"max_steps": 2, "batch_tokens": 64, "eval_every": 2, "save_every": 2,
                                 "threads": 1, "mixed_precision": "no", "lr": 0.001})
    sharded, one = tmp_path / "sharded", tmp_path / "one"
    done = two_processes(config, fsdp_env(monkeypatch), "--set", f"output.dir={sharded}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_training(load_config(config, [f"output.dir={one}", "train.grad_accum=2"]))

    for a, b in zip(_log(sharded), _log(one), strict=True):
        assert a.get("loss", a.get("val_loss")) == pytest.approx(b.get("loss", b.get("val_loss")), rel=1e-4)
    metrics = [json.loads((run / "metrics.json").read_text())["tuned"] for run in (sharded, one)]
    assert metrics[0] == pytest.approx(metrics[1], rel=1e-4)
    trained, reference = (load_file(run / "model" / "model.safetensors") for run in (sharded, one))
    base = load_file(tiny_model_dir / "model.safetensors")
    assert trained.keys() == reference.keys()
    for name, weight in reference.items():
        torch.testing.assert_close(trained[name], weight, rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.equal(trained[name], base[name]) for name in base if name in trained)


def test_fsdp_asked_for_on_cpus_without_the_launcher_says_it_runs_ddp(tmp_path, config_file, monkeypatch):
    # What accelerate does today with ACCELERATE_USE_FSDP on CPU processes: if it starts to shard
    # there, this fails, and tests/shard_on_cpu.py can go.
    done = two_processes(config_file, fsdp_env(monkeypatch), "--set", f"output.dir={tmp_path / 'ddp'}",
                         launcher=("-m", "tunesmith.cli"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "FSDP2 was asked for, but accelerate shards on GPUs only" in done.stdout + done.stderr


@pytest.mark.parametrize("env, fragment", [
    ({"FSDP_VERSION": "2"}, "privacy: DP-SGD takes per-example gradients (torch.func) of the whole parameters, "
                            "which FSDP2 splits"),
    ({"FSDP_VERSION": "1"}, "launched with FSDP1 (fsdp_version: 1): tunesmith gathers sharded weights from FSDP2 only"),
])
def test_what_cannot_train_sharded_is_refused_by_config_validation(tmp_path, tiny_model_dir, review_data,
                                                                   monkeypatch, capsys, env, fragment):
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, review_data, train={"packing": False},
                          privacy={"noise_multiplier": 1.0, "expected_batch_size": 8})
    load_config(config)  # valid when nothing is sharded
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cli_fails(capsys, ["train", str(config)], fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("saved, stage, processes, fragment", [
    (None, None, 2, None),
    ({"stage": 2, "processes": 2}, 2, 2, None),
    ({"stage": 3, "processes": 4}, 3, 4, None),
    ({"stage": 3, "processes": 2}, 3, 4, "partitioned over 2 processes; this run is under DeepSpeed ZeRO-3 on 4 "
                                         "processes: resume it under DeepSpeed ZeRO-3 on 2 processes"),
    ({"stage": 2, "processes": 2}, 3, 2, "DeepSpeed ZeRO-2's, partitioned over 2 processes; this run is under "
                                         "DeepSpeed ZeRO-3 on 2 processes"),
    ({"stage": 2, "processes": 2}, None, 2, "this run is not under DeepSpeed, on 2 processes"),
    (None, 2, 2, "its optimizer state was saved whole, not under DeepSpeed; this run is under DeepSpeed ZeRO-2"),
])
def test_which_checkpoints_resume_under_deepspeed(saved, stage, processes, fragment):
    # ZeRO's optimizer state is one partition per process: only the same stage on as many processes fits it.
    why = zero.mismatch(saved, stage, processes)
    assert why is None if fragment is None else fragment in why, why


class _OneProcess:
    """What save_checkpoint asks of accelerate's Accelerator, for one process."""
    is_main_process, process_index = True, 0

    def wait_for_everyone(self):
        pass


def test_a_checkpoint_with_zero_partitions_resumes_only_under_zero(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    partition = ({"master.0": torch.arange(4.0), "state.0.exp_avg": torch.ones(4)},
                 {"stage": 2, "processes": 1, "state": {}, "param_groups": []})
    save_checkpoint(tmp_path, model, optimizer, scheduler, {"step": 3}, [{"cpu": torch.get_rng_state()}],
                    partition=partition, accelerator=_OneProcess())
    last = tmp_path / "last"
    assert sorted(p.name for p in last.iterdir()) == ["optimizer.pt", "state.json", "trainable.safetensors",
                                                     "zero_rank0.safetensors"]
    torch.testing.assert_close(load_file(last / "zero_rank0.safetensors"), partition[0])
    assert torch.load(last / "optimizer.pt", weights_only=True)["zero"] == {"stage": 2, "processes": 1}

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    with pytest.raises(TunesmithError, match="this run is not under DeepSpeed, on 1 process: resume it under "
                                             "DeepSpeed ZeRO-2 on 1 process"):
        load_checkpoint(tmp_path, model, optimizer, scheduler)
    assert all(p.abs().sum() == 0 for p in model.parameters())  # refused before the saved weights were restored
    (last / "zero_rank0.safetensors").unlink()
    with pytest.raises(TunesmithError, match="lacks zero_rank0.safetensors, process 0's part of ZeRO's optimizer"):
        load_checkpoint(tmp_path, model, optimizer, scheduler, zero_stage=2, processes=1)


@pytest.mark.parametrize("what", ["offload_optimizer", "offload_param"])
def test_deepspeed_offload_to_nvme_is_refused_before_training(what):
    # What a checkpoint holds of ZeRO's optimizer state is its partitions in memory: NVMe swap files are not in it.
    class Plugin:
        zero_stage = 3
        deepspeed_config = {"zero_optimization": {"stage": 3, what: {"device": "nvme", "nvme_path": "/nvme"}}}

    class State:
        deepspeed_plugin = Plugin()

    class Accelerator:
        distributed_type = "DEEPSPEED"
        state = State()

    with pytest.raises(TunesmithError, match=f"zero_optimization.{what}.device: nvme"):
        zero.check_offload(Accelerator())
    Plugin.deepspeed_config = {"zero_optimization": {"stage": 3, what: {"device": "cpu"}}}
    zero.check_offload(Accelerator())
