"""Score a config's held-out rows, samples and general probes with the base model on every process (run by torchrun,
one per process, for tests/test_distributed.py); the main process writes them to a JSON file."""

from __future__ import annotations

import json
import os
import sys
from functools import partial

import torch
from accelerate import PartialState
from accelerate.utils import set_seed

from tunesmith.config import load_config
from tunesmith.eval.general import score_general
from tunesmith.session import Session
from tunesmith.train.distributed import scored_in_shares
from tunesmith.train.processes import cpu_only


def scored_model(session: Session) -> torch.nn.Module:
    """The model scored: the base, drawn alike on every process as the recipe draws it (a new head);
    for an objective scored against a reference, the method applied and its weights moved, so that
    the model is not its own reference."""
    set_seed(session.config.train.seed)
    model = session.load_model(session.data.labels)
    if session.objective.abilities.reference:
        model = session.method.apply(model, session.config.method)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn_like(p))
    return model


if __name__ == "__main__":
    config_file, out = sys.argv[1:3]
    processes = PartialState(cpu=cpu_only())
    session = Session(load_config(config_file))
    session.prepare()
    model = scored_model(session)
    scored = {"processes": session.scoring_processes(processes), "metrics": session.score(model, processes),
              "report": session.score_report(model, processes)[1], "samples": session.samples(model, processes)}
    if session.config.eval.general:
        scored["general"] = score_general(model, session.tokenizer, session.config.eval.general,
                                          partial(scored_in_shares, accelerator=processes))
    if processes.is_main_process:
        with open(out, "w") as f:
            json.dump(scored, f)
    processes.wait_for_everyone()
    processes.destroy_process_group()
    # One process in ten or so still aborts while the interpreter finalizes, after its work is done and
    # the process group is closed ("terminate called without an active exception", no Python frame: a
    # native thread left joinable at exit). The CLI's own multi-process runs (tests/test_distributed.py,
    # tests/test_sharded.py) have not shown it; this script leaves without finalizing, its output written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
