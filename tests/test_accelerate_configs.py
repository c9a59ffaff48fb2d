"""Every accelerate config in examples/accelerate/ is one that `accelerate launch` accepts.

accelerate turns FSDP and DeepSpeed on only for GPU-like devices, so here the configs are validated,
and nothing is launched (tests/test_sharded.py runs fsdp.yaml's and the DeepSpeed configs' settings
on CPUs through a launcher that turns them on). Each config goes through:
- accelerate's own loader (``load_config_from_file``), which rejects an unknown top-level key;
- a check that every key of ``fsdp_config`` and ``deepspeed_config`` is an option of its group in
  `accelerate launch`: accelerate copies these keys onto its arguments unchecked, so a misspelt one
  would be ignored in silence;
- the command on the file's first line, through `accelerate launch`'s parser and its merging of the
  config file into the arguments (``_validate_launch_command``), then the environment its launcher
  would give each process (``prepare_multi_gpu_env``, ``prepare_deepspeed_cmd_env``), and from that
  environment the FSDP or DeepSpeed plugin that ``Accelerator`` builds in each process.

Not validated here: DeepSpeed itself. The ZeRO settings are checked as far as accelerate's
``DeepSpeedPlugin`` turns them into a DeepSpeed config; tests/test_sharded.py takes them through
``deepspeed.initialize`` where DeepSpeed is installed. None of these configs has been run on GPUs here.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils import launch as accelerate_launch

from tunesmith.cli import build_parser
from tunesmith.config import load_config

ROOT = Path(__file__).parent.parent
CONFIG_DIR = ROOT / "examples" / "accelerate"
CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
README = (ROOT / "README.md").read_text()

EXPECTED = {
    "multi_gpu.yaml": DistributedType.MULTI_GPU,
    "multi_node.yaml": DistributedType.MULTI_GPU,
    "fsdp.yaml": DistributedType.FSDP,
    "deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
    "deepspeed_zero3.yaml": DistributedType.DEEPSPEED,
}
# The `accelerate launch` option group that each section's keys become options of.
SECTIONS = {"fsdp_config": "FSDP Arguments", "deepspeed_config": "DeepSpeed Arguments"}


@pytest.fixture(autouse=True)
def at_repository_root(monkeypatch):
    # The commands name their files relative to the repository root. The launcher also checks that
    # the main process's port is free on this machine, which no test should depend on.
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(accelerate_launch, "is_port_in_use", lambda port: False)


def first_line(path: Path) -> str:
    return path.read_text().splitlines()[0]


def unknown_keys(path: Path) -> list[str]:
    """Keys of the config's sections (``fsdp_config``, ...) that no `accelerate launch` option takes,
    and sections this test does not know."""
    options = {group.title: {action.dest for action in group._group_actions}
               for group in launch_command_parser()._action_groups}
    unknown = []
    for section, value in yaml.safe_load(path.read_text()).items():
        if not isinstance(value, dict):
            continue  # top-level keys: accelerate's loader rejects unknown ones
        if section not in SECTIONS:
            unknown.append(section)
            continue
        unknown += [f"{section}.{key}" for key in value if key not in options[SECTIONS[section]]]
    return unknown


def launch_args(path: Path):
    """`accelerate launch`'s arguments for the command on the config's first line, resolved as
    ``accelerate launch`` resolves them, up to the point where it would start the launcher."""
    argv = shlex.split(first_line(path).removeprefix("# "))
    assert argv[:2] == ["accelerate", "launch"]
    args = launch_command_parser().parse_args(argv[2:])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as launch_command does before it picks the DeepSpeed launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    return args


def set_process_env(env: dict[str, str], monkeypatch) -> None:
    """Put the launcher's environment for a process in place, as that process would find it."""
    for key, value in env.items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)


def tunesmith_train_config(path: Path):
    """The tunesmith config that the command on the config's first line trains."""
    args = launch_args(path)
    assert args.module and args.training_script == "tunesmith.cli"
    command = build_parser().parse_args(args.training_script_args)
    assert command.command == "train"
    return load_config(command.config)


def test_every_config_is_checked():
    assert CONFIGS and set(CONFIGS) == set(EXPECTED)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_its_command_resolves(name):
    path = CONFIG_DIR / name
    assert first_line(path).startswith(f"# accelerate launch --config_file examples/accelerate/{name} ")
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == EXPECTED[name]
    # tunesmith autocasts itself (train.mixed_precision): accelerate's must stay off.
    assert config.mixed_precision == "no"
    assert unknown_keys(path) == []

    args = launch_args(path)
    assert args.mixed_precision == "no" and args.num_processes == config.num_processes
    tunesmith_train_config(path)  # the command trains a tunesmith config that exists and validates


def test_a_misspelt_key_is_caught(tmp_path):
    text = (CONFIG_DIR / "fsdp.yaml").read_text()
    in_section = tmp_path / "in_section.yaml"
    in_section.write_text(text.replace("fsdp_use_orig_params:", "fsdp_use_original_params:"))
    assert unknown_keys(in_section) == ["fsdp_config.fsdp_use_original_params"]
    top_level = tmp_path / "top_level.yaml"
    top_level.write_text(text.replace("num_machines:", "num_machine:"))
    with pytest.raises(ValueError, match="unknown keys"):
        load_config_from_file(str(top_level))


def test_ddp_on_one_machine_starts_a_process_per_gpu():
    args = launch_args(CONFIG_DIR / "multi_gpu.yaml")
    env = accelerate_launch.prepare_multi_gpu_env(args)
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
    assert args.num_machines == 1 and args.nproc_per_node == str(args.num_processes)
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"


def test_ddp_on_two_machines_meets_at_the_main_machine():
    path = CONFIG_DIR / "multi_node.yaml"
    config = load_config_from_file(str(path))
    args = launch_args(path)
    env = accelerate_launch.prepare_multi_gpu_env(args)
    assert args.multi_gpu and args.nnodes == "2" and args.node_rank == config.machine_rank == 0
    assert int(args.nproc_per_node) * 2 == config.num_processes
    assert args.rdzv_endpoint == f"{config.main_process_ip}:{config.main_process_port}"
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"


def test_fsdp_shards_every_decoder_layer_of_a_lora_llama(monkeypatch):
    import torch
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp import CPUOffloadPolicy
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.methods import get_method
    from tunesmith.methods.lora import Options
    from tunesmith.train.step import LossForward

    args = launch_args(CONFIG_DIR / "fsdp.yaml")
    assert args.use_fsdp
    set_process_env(accelerate_launch.prepare_multi_gpu_env(args), monkeypatch)
    plugin = FullyShardedDataParallelPlugin()  # what Accelerator builds from that environment
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # full sharding
    assert not isinstance(plugin.cpu_offload, CPUOffloadPolicy)
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert plugin.mixed_precision_policy is None

    # SmolLM2 is a Llama: a tiny one with LoRA, wrapped as the loop hands it to accelerate.prepare.
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    forward = LossForward(get_method("lora").apply(llama, Options(r=2)), batches=None)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, forward)
    assert [type(m).__name__ for m in forward.modules() if policy(m)] == ["LlamaDecoderLayer"] * 2

    # fsdp_use_orig_params is read by FSDP1 only, as the config's comment says. (Without a GPU, FSDP1
    # cannot sync module states from rank 0: off for this check.)
    assert plugin.use_orig_params is None
    monkeypatch.setenv("FSDP_VERSION", "1")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "FULL_SHARD")
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")
    assert FullyShardedDataParallelPlugin().use_orig_params is True


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_matches_the_tunesmith_config_it_trains(monkeypatch, stage):
    path = CONFIG_DIR / f"deepspeed_zero{stage}.yaml"
    args = launch_args(path)
    assert args.use_deepspeed
    command, env = accelerate_launch.prepare_deepspeed_cmd_env(args)
    assert command is None  # one machine: torch's launcher, not DeepSpeed's runner
    set_process_env(env, monkeypatch)
    plugin = DeepSpeedPlugin()  # what Accelerator builds from that environment
    plugin.set_mixed_precision(env["ACCELERATE_MIXED_PRECISION"])
    ds = plugin.deepspeed_config
    assert ds["zero_optimization"]["stage"] == stage
    assert not plugin.zero3_init_flag  # the method is applied to the whole base before ZeRO partitions it
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert ds["zero_optimization"]["offload_param"]["device"] == "none"
    assert not ds["fp16"]["enabled"] and not ds["bf16"]["enabled"]
    assert ds["gradient_accumulation_steps"] == 1

    # DeepSpeed clips, and steps the optimizer after every backward: the tunesmith config must ask
    # for the same clipping and accumulate nothing itself.
    train = tunesmith_train_config(path).train
    assert ds["gradient_clipping"] == train.max_grad_norm
    assert train.grad_accum == 1


def _readme_launch_lines() -> list[list[str]]:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            if line.startswith(("accelerate launch ", "torchrun ")):
                lines.append(shlex.split(line))
    return lines


def test_readme_launch_commands_parse_and_show_every_config():
    from torch.distributed.run import get_args_parser

    launches = _readme_launch_lines()
    assert {argv[0] for argv in launches} == {"accelerate", "torchrun"}
    for argv in launches:
        if argv[0] == "accelerate":
            args = launch_command_parser().parse_args(argv[2:])
            assert args.config_file is None or (ROOT / args.config_file).is_file(), args.config_file
        else:
            args = get_args_parser().parse_args(argv[1:])
        assert args.module and args.training_script == "tunesmith.cli", argv
    for name in CONFIGS:
        assert f"examples/accelerate/{name}" in README, name
