"""The README's commands are real: every `tunesmith ...` line, and the tunesmith part of every
`... -m tunesmith.cli ...` launcher line, parses; every config it names exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from tunesmith.cli import build_parser

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def _commands():
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    for block in blocks:
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("tunesmith "):
                yield shlex.split(line)[1:]
            elif " -m tunesmith.cli " in line:  # accelerate launch ..., torchrun ...
                yield shlex.split(line.split(" -m tunesmith.cli ", 1)[1])


def test_readme_tunesmith_commands_parse():
    commands = list(_commands())
    assert len(commands) >= 5
    parser = build_parser()
    for argv in commands:
        args = parser.parse_args(argv)
        config = getattr(args, "config", None)
        if config and config != "CONFIG":
            assert (ROOT / config).is_file(), config


def test_readme_names_the_two_setup_commands_and_ci_runs_one():
    assert "make demo" in README and "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "\ndemo:" in makefile and "\ntest:" in makefile and "torch==2.13.0" in makefile
