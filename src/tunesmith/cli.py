"""The ``tunesmith`` command: train, eval, generate, compare, data inspect, privacy audit.

User errors print one line per problem and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from tunesmith.errors import TunesmithError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


def _quiet_libraries() -> None:
    # The libraries' own warnings (deprecations, "generation flags") bury what matters to the user.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cmd_train(args) -> int:
    from tunesmith.config import load_config
    from tunesmith.recipe import run_training
    from tunesmith.train.loop import Interrupted

    config = load_config(args.config, args.set)
    try:
        report = run_training(config, resume=args.resume)
    except KeyboardInterrupt as interrupt:
        print(f"\ninterrupted: checkpoint saved in {config.output.dir}/checkpoints/last; "
              f"continue with: tunesmith train {args.config} --resume"
              + "".join(f" --set {s}" for s in args.set), file=sys.stderr)
        return EXIT_TERMINATED if isinstance(interrupt, Interrupted) else EXIT_INTERRUPTED
    print(f"report: {report}")
    return 0


def cmd_eval(args) -> int:
    from tunesmith.recipe import evaluate_run

    base, tuned = evaluate_run(Path(args.run_dir), args.data)
    from tunesmith.eval.report import metrics_table

    print(metrics_table(base, tuned))
    print(json.dumps({"base": base, "tuned": tuned}))
    return 0


def cmd_generate(args) -> int:
    from tunesmith.recipe import generate

    generate(Path(args.run_dir), args.prompt, args.max_new_tokens)
    return 0


def cmd_inspect(args) -> int:
    from tunesmith.config import load_config
    from tunesmith.data.pipeline import format_stats
    from tunesmith.session import Session

    data = Session(load_config(args.config, args.set)).prepare()
    print(format_stats(data.stats))
    leak = data.stats["leakage"]
    for ex in leak.get("examples", []):
        print(f"{ex['kind']} duplicate in {ex['split']} (similarity {ex['similarity']:.2f}): "
              f"{ex['text'][:80]!r} ~ {ex['match_split']} {ex['match'][:80]!r}")
    return 0


def cmd_audit(args) -> int:
    from tunesmith.privacy.audit import format_audit
    from tunesmith.recipe import audit_run

    result = audit_run(Path(args.run_dir), args.candidates, args.max_examples)
    print(format_audit(result))
    print(f"audit: {Path(args.run_dir) / 'privacy_audit.json'}")
    return 0


def cmd_compare(args) -> int:
    from tunesmith.compare import compare

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    table = compare(args.config, methods, args.set, Path(args.out))
    print(table.read_text())
    print(f"table: {table}")
    return 0


def cmd_search(args) -> int:
    from tunesmith.search import search

    report = search(args.config, args.trials, args.workers, args.storage, args.set)
    print(f"report: {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune pretrained language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune as a config says, then evaluate base and tuned model")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="test metrics of a run's base and tuned model, side by side")
    p.add_argument("run_dir")
    p.add_argument("--data", help="evaluate on this file (all rows) instead of the run's test split")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="stream a tuned model's answer to a prompt")
    p.add_argument("run_dir")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("compare", help="train several methods on the same splits; table of cost and quality")
    p.add_argument("config")
    p.add_argument("--methods", default="full,lora", help="comma-separated method names")
    p.add_argument("--out", default="runs/compare", help="directory for the runs and compare.md / compare.csv")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("inspect", help="data statistics (rows dropped, token lengths, labels, leakage)")
    q.add_argument("config")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    q.set_defaults(func=cmd_inspect)

    p = sub.add_parser("privacy", help="privacy tools")
    privacy_sub = p.add_subparsers(dest="privacy_command", required=True)
    q = privacy_sub.add_parser("audit", help="what a run memorised: canary exposure and membership inference")
    q.add_argument("run_dir")
    q.add_argument("--candidates", type=_at_least_two, default=1000,
                   help="secrets scored per canary template (every one when there are no more)")
    q.add_argument("--max-examples", type=_at_least_two, default=1000,
                   help="training rows, and held-out rows, scored at most (a seeded sample)")
    q.set_defaults(func=cmd_audit)

    p = sub.add_parser("search", help="hyperparameter search (Optuna): the config's search section names the space")
    p.add_argument("config")
    p.add_argument("--trials", type=_at_least_one, required=True,
                   help="trials the study ends with (run again, the command continues the study)")
    p.add_argument("--workers", type=_at_least_one, default=1, help="worker processes on this machine")
    p.add_argument("--storage", help="an Optuna RDB URL (postgresql://...), for workers on several machines; "
                   "default: OUTPUT_DIR/study.sqlite")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_search)
    return parser


def _at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 2, got {text}")
    return value


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _quiet_libraries()
    try:
        return args.func(args)
    except TunesmithError as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
