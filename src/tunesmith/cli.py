"""The ``tunesmith`` command: train, eval, generate, compare, data inspect, privacy audit, ppo, grpo, serve, ui,
judge.

User errors print one line per problem and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from contextlib import nullcontext
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

    config = load_config(args.config, args.set)
    try:
        report = run_training(config, resume=args.resume, parent=args.parent)
    except KeyboardInterrupt as interrupt:
        return _interrupted(interrupt, config.output.dir, f"tunesmith train {args.config}", args.set)
    print(f"report: {report}")
    return 0


def _interrupted(interrupt: KeyboardInterrupt, run_dir: str, command: str, overrides: list[str]) -> int:
    """What a stopped run left, and how to go on; the exit status of Ctrl-C or of SIGTERM."""
    from tunesmith.stopping import Interrupted
    from tunesmith.store import Run

    run = Run(run_dir, writer=False)
    again = f"{command} --resume" + "".join(f" --set {s}" for s in overrides)
    if run.has_checkpoint():
        said = f"checkpoint saved in {run.checkpoints}; continue with: {again}"
    elif run.status():
        said = f"stopped before the first checkpoint; `{again}` starts its training from the beginning"
    else:
        said = f"stopped before the run started; nothing was written to {run.path}"
    print(f"\ninterrupted: {said}", file=sys.stderr)
    return EXIT_TERMINATED if isinstance(interrupt, Interrupted) else EXIT_INTERRUPTED


def cmd_eval(args) -> int:
    from tunesmith.evaluate import evaluate_run_report

    if args.bias:
        return cmd_bias(args)

    base, tuned, classes = evaluate_run_report(Path(args.run_dir), args.data)
    from tunesmith.eval.baselines import compare_line
    from tunesmith.eval.classification import format_console
    from tunesmith.eval.report import metrics_table
    from tunesmith.store import Run

    print(metrics_table(base, tuned))
    decision = Run(args.run_dir, writer=False).decision()
    if decision:
        print(f"tuned labels by the {decision.describe()}")
    if classes:
        print(format_console(classes))
        # The baselines the run scored on its own test split (another file's rows have no training split).
        found = None if args.data else Run(args.run_dir, writer=False).load_json("metrics", {}).get("baselines")
        if found:
            print(compare_line(found, tuned))
    print(json.dumps({"base": base, "tuned": tuned} | ({"classification": classes} if classes else {})))
    return 0


def cmd_predict(args) -> int:
    from tunesmith.predict import predict_file

    summary = predict_file(args.run_dir, args.data, args.out, args.batch_size)
    resumed = f", continuing after the {summary['resumed_after']} rows written before" if summary["resumed_after"] else ""
    print(f"predictions: {summary['out']}: {summary['rows']} rows{resumed}; "
          f"{summary['errors']} rows could not be read (their error is in the file)")
    return 1 if summary["errors"] else 0


def cmd_bias(args) -> int:
    from tunesmith.lifecycle.bias import bias_run, format_bias

    print(format_bias(bias_run(Path(args.run_dir), args.bias), args.bias))
    print(f"bias: {Path(args.run_dir) / 'bias.md'}")
    return 0


def cmd_generate(args) -> int:
    from tunesmith.store import Run

    if Run(args.run_dir, writer=False).alignment():
        from tunesmith.align.loop import generate
    else:
        from tunesmith.evaluate import generate
    generate(Path(args.run_dir), args.prompt, args.max_new_tokens)
    return 0


# Keys of an accelerate config (examples/accelerate/), which no tunesmith config has.
ACCELERATE_KEYS = {"compute_environment", "distributed_type"}


def cmd_inspect(args) -> int:
    """The data a config trains on (train, search: the base run's), or the prompts of a PPO or GRPO config."""
    from tunesmith.config import load_config, read_config_file
    from tunesmith.data.pipeline import format_stats
    from tunesmith.session import Session
    from tunesmith.train.loop import describe_plan

    raw = read_config_file(args.config)
    if ACCELERATE_KEYS & raw.keys():
        raise TunesmithError(_accelerate_config(args.config))
    from tunesmith.align.options import LOADERS

    if aligned := [section for section in LOADERS if section in raw]:
        return _inspect_prompts(args, raw, aligned[0])
    config = load_config(args.config, args.set, raw=raw)
    print(f"{args.config} ({_data_command(raw)}): data {_data_names(config.data)}")
    session = Session(config)
    data = session.prepare()
    print(format_stats(data.stats))
    if data.encoded["train"]:
        print(describe_plan(session.objective.batches(data.encoded["train"]), config.train, processes=1)
              + " (one process)")
    leak = data.stats["leakage"]
    for ex in leak.get("examples", []):
        print(f"{ex['kind']} duplicate in {ex['split']} (similarity {ex['similarity']:.2f}): "
              f"{ex['text'][:80]!r} ~ {ex['match_split']} {ex['match'][:80]!r}")
    return 0


def _inspect_prompts(args, raw: dict, section: str) -> int:
    """A ``tunesmith ppo`` or ``grpo`` config has no data section: its data is the prompts it samples from."""
    from tunesmith.align.options import LOADERS
    from tunesmith.align.prompts import format_prompt_stats, inspect_prompts

    config = LOADERS[section](args.config, args.set, raw=raw)
    cfg = config.rollout
    rows = "".join(f", rows whose {k} is {v if isinstance(v, str) else ' or '.join(v)}"
                   for k, v in cfg.prompt_filter.items())
    print(f"{args.config} (tunesmith {section}): prompts from {cfg.prompts}, column {cfg.prompt_column}{rows}")
    print(format_prompt_stats(inspect_prompts(config)))
    return 0


def _data_command(raw: dict) -> str:
    if "search" not in raw:
        return "tunesmith train"
    space = raw["search"].get("space") if isinstance(raw["search"], dict) else None
    varied = [path for path in space if str(path).startswith("data.")] if isinstance(space, dict) else []
    return ("tunesmith search; the base run's data, which every trial reads"
            + (f", each with its own {', '.join(varied)}: shown at the base value" if varied else ""))


def _data_names(data) -> str:
    if data.sources:
        return ", ".join(f"{source.label} {source.path}" for source in data.sources)
    if data.path:
        return data.path
    return ", ".join(f"{split} {getattr(data, split)}" for split in ("train", "validation", "test")
                     if getattr(data, split))


def _accelerate_config(path: str) -> str:
    """Why an accelerate config has nothing to inspect, and which config its launch line trains."""
    launched = Path(path).read_text().partition("\n")[0].partition(" -m tunesmith.cli ")[2].split()
    config = next((a for a in launched[1:] if a.endswith((".yaml", ".yml"))), None)
    return (f"{path}: an accelerate config (for `accelerate launch --config_file`), not a tunesmith config; "
            "it has no data. Inspect the tunesmith config it launches"
            + (f": tunesmith data inspect {config}" if config else ""))


def cmd_audit(args) -> int:
    from tunesmith.evaluate import audit_run
    from tunesmith.privacy.audit import format_audit

    result = audit_run(Path(args.run_dir), args.candidates, args.max_examples, [Path(p) for p in args.against])
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


def cmd_serve(args) -> int:
    from tunesmith.serve.access import load_access
    from tunesmith.serve.keys import check_binding
    from tunesmith.serve.options import ServeOptions
    from tunesmith.serve.server import build_server, parse_aliases, parse_runs
    from tunesmith.store.aliases import DEFAULT_PATH as DEFAULT_ALIAS_FILE

    options = ServeOptions(**{name: getattr(args, name) for name in ServeOptions.model_fields})
    access = load_access(args.api_key_file, args.rater_key_file, args.user_key_file)
    check_binding(args.host, access.keys())  # before the model loads: refusing should be quick
    server = build_server(parse_runs(args.runs), base=args.base, adapter_dirs=[Path(d) for d in args.adapter_dir],
                          aliases=parse_aliases(args.alias), options=options, access=access,
                          store=Path(args.store) if args.store else None, redact_pii=args.redact_pii,
                          alias_file=Path(args.alias_file) if args.alias_file else DEFAULT_ALIAS_FILE)
    served = server.pool.models() + server.scorers.models()
    print(f"serving {', '.join(m['id'] for m in served)} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    server.run(args.host, args.port)
    return 0


def cmd_ui(args) -> int:
    from tunesmith import feedback
    from tunesmith.serve.access import load_access
    from tunesmith.serve.keys import check_binding
    from tunesmith.serve.options import ServeOptions
    from tunesmith.serve.server import parse_aliases, parse_runs
    from tunesmith.store.db import STORE_ENV
    from tunesmith.ui.app import UiContext, build_ui_server

    options = ServeOptions(**{name: getattr(args, name) for name in ServeOptions.model_fields})
    access = load_access(args.api_key_file, args.rater_key_file, args.user_key_file)
    check_binding(args.host, access.keys())  # before the model loads: refusing should be quick
    runs_dir = Path(args.dir)
    if not runs_dir.is_dir():
        raise TunesmithError(f"--dir {runs_dir}: no such directory")
    store = Path(args.store or os.environ.get(STORE_ENV) or runs_dir / "store.sqlite")
    prompts = feedback.read_prompts(args.prompts) if args.prompts else []
    ctx = UiContext(runs_dir=runs_dir, store_path=store, examples_dir=Path(args.examples), prompts=prompts)
    server = build_ui_server(ctx, parse_runs(args.runs), base=args.base, options=options, access=access,
                             aliases=parse_aliases(args.alias), redact_pii=args.redact_pii,
                             alias_file=Path(args.alias_file) if args.alias_file else runs_dir / "aliases.json")
    print(f"tunesmith ui on http://{args.host}:{args.port}/ui/ (runs in {runs_dir}; serving "
          f"{', '.join(m['id'] for m in server.pool.models())})", file=sys.stderr)
    server.run(args.host, args.port)
    return 0


def cmd_export(args) -> int:
    from tunesmith.export import export_run

    out = export_run(Path(args.run_dir), args.format, Path(args.out), args.dtype)
    print(f"exported: {out}")
    return 0


def cmd_monitor(args) -> int:
    import traceback

    from tunesmith.monitor.drift import Thresholds, monitor_run

    thresholds = Thresholds(alpha=args.alpha, auc=args.auc_threshold, min_prompts=args.min_prompts,
                            max_examples=args.max_examples, permutations=args.permutations)
    try:
        result = monitor_run(Path(args.run_dir), args.out, args.store, args.adapter, args.since, thresholds)
    except TunesmithError:
        raise
    except Exception:  # noqa: BLE001 - scripts read exit 1 as drift: a crash must not look like one
        traceback.print_exc()
        return EXIT_USER_ERROR
    print(f"MMD p = {result['mmd_p_value']:.4f}  domain AUC = {result['domain_auc']:.3f}  "
          f"-> {'DRIFT' if result['drift'] else 'no drift'}")
    print(f"report: {result['report']}")
    return 1 if result["drift"] else 0


def cmd_retrain(args) -> int:
    import traceback

    from tunesmith.retrain.loop import retrain
    from tunesmith.store.aliases import DEFAULT_PATH as DEFAULT_ALIAS_FILE

    alias_file = Path(args.alias_file) if args.alias_file else DEFAULT_ALIAS_FILE
    try:
        record = retrain(Path(args.run_dir), args.out, args.store, args.adapter, args.since, args.set,
                         holdout=args.holdout, replay_ratio=args.replay, min_rows=args.min_rows,
                         min_score=args.min_score, tolerance=args.tolerance, alias=args.alias,
                         alias_file=alias_file, log=args.log, consensus=_consensus(args), objective=args.objective,
                         judge=args.judge, judge_label=args.judge_label, judge_samples=args.judge_samples)
    except TunesmithError:
        raise
    except Exception:  # noqa: BLE001 - exit 1 means "refused": a crash must not look like one
        traceback.print_exc()
        return EXIT_USER_ERROR
    decision = record["decision"]
    print(f"{'PROMOTED' if decision['promote'] else 'REFUSED'}: {record['child']}: {decision['reason']}")
    if decision["promote"] and record["alias"]:
        print(f"alias {record['alias']} -> {record['child']} ({alias_file})")
    return 0 if decision["promote"] else 1


def cmd_score(args) -> int:
    from tunesmith.data.io import read_records
    from tunesmith.score import load_scorer

    texts = list(args.texts)
    if args.file:
        records = read_records(args.file)
        if "text" not in records[0]:
            raise TunesmithError(f"{args.file}: no column 'text'; columns found: "
                                 + ", ".join(c for c in records[0] if not c.startswith("_")))
        texts += [str(r["text"]) for r in records]
    if not texts:
        raise TunesmithError("score: give texts to score, or --file")
    scorer = load_scorer(args.run_dir, args.label, args.batch_size)
    framed = [scorer.frame(args.prompt, t) for t in texts] if args.prompt is not None else texts
    print(f"# {scorer.what}", file=sys.stderr)
    for text, score in zip(texts, scorer.score(framed)):
        print(f"{score:.4f}\t{text}")
    return 0


def cmd_feedback_collect(args) -> int:
    from tunesmith import feedback
    from tunesmith.store import db as store

    if args.samples and args.run2:
        raise TunesmithError("feedback collect: --samples compares two answers of one run; give one run")
    prompts = feedback.read_prompts(args.prompts)
    sources = feedback.run_sources([args.run_dir, *([args.run2] if args.run2 else [])], args.samples,
                                   args.max_new_tokens, args.seed)
    path = Path(args.store) if args.store else store.default_path()
    counts = feedback.collect(store.connect(path), prompts, sources, args.rater or feedback.default_rater(),
                              scale=args.scale, seed=args.seed)
    print(f"recorded in {path}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def cmd_feedback_export(args) -> int:
    from tunesmith import feedback
    from tunesmith.store import db as store

    path = Path(args.store) if args.store else store.default_path()
    if not path.is_file():
        raise TunesmithError(f"{path}: no feedback store here; give --store")
    left_out: dict[str, int] = {}
    n = feedback.export(store.connect(path), Path(args.out), _consensus(args), left_out, args.kind, args.adapter,
                        args.min_score)
    why = ", ".join(f"{count} {reason}" for reason, count in left_out.items())
    what = "answers marked good or bad" if args.kind == "kto" else "preference pairs"
    print(f"wrote {n} {what} to {args.out}" + (f" (items left out: {why})" if why else ""))
    return 0


def cmd_runs_show(args) -> int:
    from tunesmith.store.lineage import format_chain

    print(format_chain(args.run_dir))
    return 0


def cmd_objectives(args) -> int:
    from tunesmith.objectives import table

    print(table())
    return 0


def cmd_runs_list(args) -> int:
    from tunesmith.store.lineage import runs_table

    print(runs_table(args.dir))
    return 0


def cmd_merge(args) -> int:
    from tunesmith.lifecycle.merge import merge_runs

    weights = args.weights or [1 / len(args.runs)] * len(args.runs)
    report = merge_runs(args.runs, args.how, weights, args.out, args.into_base, args.density)
    print(report.read_text())
    print(f"report: {report}")
    return 0


def cmd_ppo(args) -> int:
    from tunesmith.align.options import load_ppo_config
    from tunesmith.align.recipe import run_ppo

    return _align(args, "ppo", load_ppo_config, run_ppo)


def cmd_grpo(args) -> int:
    from tunesmith.align.grpo_recipe import run_grpo
    from tunesmith.align.options import load_grpo_config

    return _align(args, "grpo", load_grpo_config, run_grpo)


def _align(args, command: str, load, run) -> int:
    """``tunesmith ppo|grpo CONFIG``: load the config, run the recipe, say what a stop left."""
    config = load(args.config, args.set)
    try:
        report = run(config, resume=args.resume)
    except KeyboardInterrupt as interrupt:
        return _interrupted(interrupt, config.output.dir, f"tunesmith {command} {args.config}", args.set)
    print(f"report: {report}")
    return 0


def cmd_judge(args) -> int:
    from tunesmith.judge import headline, judge_run

    result = judge_run(Path(args.run_dir), Path(args.by), label=args.label, prompts=args.prompts,
                       samples_per_prompt=args.samples, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, seed=args.seed)
    print(headline(result))
    print(f"report: {Path(args.run_dir) / 'report.md'}")
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
    p.add_argument("--from", dest="parent", metavar="RUN",
                   help="start from a finished run's weights (same model, method and objective), on new data")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="test metrics of a run's base and tuned model, side by side")
    p.add_argument("run_dir")
    p.add_argument("--data", help="evaluate on this file (all rows) instead of the run's test split")
    p.add_argument("--bias", metavar="PROBE",
                   help="counterfactual pairs (builtin, or a CSV/JSONL of pair, attribute, group, text): "
                        "base vs tuned gaps")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="every row's prediction (and each label's probability) into a CSV, JSONL "
                       "or Parquet file; continues an interrupted output")
    p.add_argument("run_dir")
    p.add_argument("--data", required=True, help="the rows to predict, in any format training reads")
    p.add_argument("--out", required=True, help="where to write them: .csv, .jsonl or .parquet")
    p.add_argument("--batch-size", type=_at_least_one, default=32, help="rows scored together")
    p.set_defaults(func=cmd_predict)

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
    q = data_sub.add_parser("inspect", help="data statistics (rows dropped, token lengths, labels, leakage); "
                            "for a PPO config, its prompts")
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
    q.add_argument("--against", action="append", default=[], metavar="RUN",
                   help="an audited run to show side by side in the report (for example the job without DP)")
    q.set_defaults(func=cmd_audit)

    p = sub.add_parser("serve", help="serve runs' LoRA adapters on one base model behind OpenAI routes")
    p.add_argument("runs", nargs="*", metavar="[NAME=]RUN", help="run directories to serve, each as its name")
    _serve_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ui", help="the web UI: runs, launch, compare, chat and rate, on the serve command's server")
    p.add_argument("runs", nargs="*", metavar="[NAME=]RUN",
                   help="runs to serve for chat and rating (default: the finished LoRA runs under --dir)")
    p.add_argument("--dir", default="runs", help="the runs the UI lists, and where it launches new ones")
    p.add_argument("--examples", default="examples", help="the example configs the launch page offers")
    p.add_argument("--prompts", help="the rate page's prompts: a file with a 'prompt' column (.txt: one per "
                   "paragraph), as feedback collect reads (default: the prompts already in the store)")
    _serve_arguments(p, adapter_dir=False)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("export", help="a run's merged model as a Hugging Face directory or a GGUF file")
    p.add_argument("run_dir")
    p.add_argument("--format", choices=["hf", "gguf"], required=True)
    p.add_argument("--out", required=True, help="the directory (hf) or file (gguf) to write; must not exist")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="gguf: the type of the matrices (norms stay float32)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("monitor", help="has the served traffic drifted from the run's training inputs? "
                       "exit 0: no drift, 1: drift, 2: error")
    p.add_argument("run_dir")
    p.add_argument("--since", help="only prompts logged at or after this ISO 8601 time (UTC if no zone)")
    p.add_argument("--store", help="the SQLite store the server logs to (default: $TUNESMITH_STORE, "
                   "else runs/store.sqlite)")
    p.add_argument("--adapter", help="the name the run was served under (default: the run directory's name)")
    p.add_argument("--out", help="a new folder for the report (default: runs/monitor/ADAPTER-TIME)")
    p.add_argument("--alpha", type=float, default=0.05, help="MMD: drift when the p-value is below this")
    p.add_argument("--auc-threshold", type=float, default=0.55, help="domain classifier: drift above this AUC")
    p.add_argument("--min-prompts", type=_at_least_two, default=20)
    p.add_argument("--max-examples", type=_at_least_two, default=500,
                   help="training inputs, and prompts, compared at most (a seeded sample)")
    p.add_argument("--permutations", type=int, default=200, help="MMD permutations (at least 100)")
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser("retrain", help="train a child on rated traffic + replay; promote it only if the gate "
                       "passes. exit 0: promoted, 1: refused, 2: error")
    p.add_argument("run_dir")
    p.add_argument("--store", help="the SQLite store (default: $TUNESMITH_STORE, else runs/store.sqlite)")
    p.add_argument("--adapter", help="the name the run was served under (default: the run directory's name)")
    p.add_argument("--since", help="only answers logged at or after this ISO 8601 time (UTC if no zone)")
    p.add_argument("--out", help="the child run's directory (default: RUN-retrain-TIME beside RUN)")
    p.add_argument("--holdout", type=float, default=0.2, help="share of the rated rows held out for the gate")
    p.add_argument("--replay", type=float, default=1.0, help="original training rows per new row")
    p.add_argument("--min-rows", type=_at_least_two, default=20, help="usable rated answers needed")
    p.add_argument("--min-score", type=float, default=1.0, help="a score at least this approves an answer "
                   "(thumbs up is 1.0)")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="how much worse on the original test set the child may be (in the metric's units)")
    p.add_argument("--alias", help="on promotion, point this alias at the child in --alias-file")
    p.add_argument("--alias-file", help="{alias: run directory}, which tunesmith serve follows "
                   "(default: runs/aliases.json)")
    p.add_argument("--log", default="runs/retrain_decisions.jsonl", help="every decision is appended here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the child's config")
    p.add_argument("--objective", help="the child's objective, for a run that writes answers: dpo (pairs: thumbs up "
                   "over down, and rate-page choices), kto (the thumbs themselves, up and down) or reward (a reward "
                   "model of those pairs, from the base, gated on pairwise accuracy); the default: the run's own "
                   "objective")
    p.add_argument("--judge", help="a reward-model or classifier run: parent and child sample answers to the "
                   "held-out new prompts and the child must have the higher mean score by it (instead of the "
                   "objective's metric on the new rows); for a child that writes answers")
    p.add_argument("--judge-label", default="positive", help="with a classifier --judge: the label whose log-odds "
                   "is the score")
    p.add_argument("--judge-samples", type=int, default=2, help="--judge: answers sampled per held-out prompt")
    _consensus_arguments(p, "an input")
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser("score", help="score texts with a reward-model run, or a classifier's probability of a label")
    p.add_argument("run_dir")
    p.add_argument("texts", nargs="*", metavar="TEXT")
    p.add_argument("--file", help="score the 'text' column of this file (.txt: one text per paragraph)")
    p.add_argument("--prompt", help="the texts are answers to this prompt: framed as in training")
    p.add_argument("--label", help="classification runs: the label whose probability is the score "
                   "(default: positive if the run has it, else its first label)")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("feedback", help="collect human preferences in the terminal; export them as pairs")
    feedback_sub = p.add_subparsers(dest="feedback_command", required=True)
    q = feedback_sub.add_parser("collect", help="show two answers per prompt (or one to rate) and record choices")
    q.add_argument("run_dir")
    q.add_argument("run2", nargs="?", help="a second run to compare with (default: the run's base model)")
    q.add_argument("--prompts", required=True, help="a file with a 'prompt' column (.txt: one per paragraph)")
    q.add_argument("--store", help="the SQLite store (default: $TUNESMITH_STORE, else runs/store.sqlite)")
    q.add_argument("--rater", help="who is rating (default: the user name)")
    q.add_argument("--scale", action="store_true", help="rate one answer 1-5 instead of choosing between two")
    q.add_argument("--samples", action="store_true", help="compare two sampled answers of the one run")
    q.add_argument("--max-new-tokens", type=int, default=128)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_feedback_collect)
    q = feedback_sub.add_parser("export", help="write the choices as prompt/chosen/rejected JSONL, or the thumbs "
                                "on served answers as prompt/completion/label (--as kto)")
    q.add_argument("--store", help="the SQLite store (default: $TUNESMITH_STORE, else runs/store.sqlite)")
    q.add_argument("--out", required=True)
    q.add_argument("--as", dest="kind", choices=["pairs", "kto"], default="pairs",
                   help="pairs: the choices between two answers; kto: each served answer rated thumbs up or down")
    q.add_argument("--adapter", help="--as kto: only the answers of this served adapter (default: every one)")
    q.add_argument("--min-score", type=float, default=1.0, help="--as kto: a score at least this is good, a lower "
                   "one bad (thumbs up is 1.0, down 0.0)")
    _consensus_arguments(q, "a prompt and its two models (--as kto: a prompt and an answer)")
    q.set_defaults(func=cmd_feedback_export)

    p = sub.add_parser("objectives", help="the objectives and what each can do: head, data, metrics, answers, scores")
    p.set_defaults(func=cmd_objectives)

    p = sub.add_parser("runs", help="runs and their lineage")
    runs_sub = p.add_subparsers(dest="runs_command", required=True)
    q = runs_sub.add_parser("show", help="a run and the chain of runs it continued (tunesmith train --from)")
    q.add_argument("run_dir")
    q.set_defaults(func=cmd_runs_show)
    q = runs_sub.add_parser("list", help="a table of the runs in a directory: status, method, metrics, parent")
    q.add_argument("dir", nargs="?", default="runs")
    q.set_defaults(func=cmd_runs_list)

    p = sub.add_parser("merge", help="merge runs' LoRA or IA3 adapters into a new run (PEFT add_weighted_adapter)")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--how", default="linear", choices=["linear", "ties", "dare_ties", "svd"],
                   help="how the adapters combine: linear for every method that merges; ties, dare_ties, svd: LoRA")
    p.add_argument("--weights", type=float, nargs="+", help="one per run (default: equal, summing to 1)")
    p.add_argument("--density", type=float, default=0.5, help="ties, dare_ties: the share of each update kept")
    p.add_argument("--out", required=True, help="the new run's directory")
    p.add_argument("--into-base", action="store_true",
                   help="also write the merged full model (safetensors) to OUT/merged")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("ppo", help="align a model with PPO against a reward run (a classifier or reward model)")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--resume", action="store_true", help="continue an interrupted PPO run from its checkpoint")
    p.set_defaults(func=cmd_ppo)

    p = sub.add_parser("grpo", help="align a model with GRPO against verifiable rewards (functions, exact match, "
                       "regex, JSON schema) or a reward run")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--resume", action="store_true", help="continue an interrupted GRPO run from its checkpoint")
    p.set_defaults(func=cmd_grpo)

    p = sub.add_parser("judge", help="win-rate of a run's tuned model over its base, judged by a reward model "
                       "or classifier run, and its KL to the reference")
    p.add_argument("run_dir", metavar="RUN", help="a finished causal or DPO run")
    p.add_argument("--by", required=True, metavar="JUDGE_RUN",
                   help="the judge: a reward-model run, a classification run, or a causal run on label data")
    p.add_argument("--label", default="positive", help="with a classifier judge: the label whose log-odds is the score")
    p.add_argument("--prompts", type=_at_least_one, default=40,
                   help="held-out prompts answered (the test split's first)")
    p.add_argument("--samples", type=_at_least_one, default=2, help="answers sampled per prompt, by each model")
    p.add_argument("--max-new-tokens", type=_at_least_one, default=48)
    p.add_argument("--temperature", type=_positive, default=1.0, help="sampling temperature (no top-k, no top-p)")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed, the same for both models")
    p.set_defaults(func=cmd_judge)

    p = sub.add_parser("search", help="hyperparameter search (Optuna): the config's search section names the space")
    p.add_argument("config")
    p.add_argument("--trials", type=_at_least_one, required=True,
                   help="trials the study ends with (run again, the command continues the study)")
    p.add_argument("--workers", type=_at_least_one, default=1, help="worker processes on this machine")
    p.add_argument("--storage", help="an Optuna RDB URL (postgresql+psycopg://...), for workers on several machines; "
                   "default: OUTPUT_DIR/study.sqlite")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_search)
    return parser


def _serve_arguments(p: argparse.ArgumentParser, adapter_dir: bool = True) -> None:
    """The server's options, shared by ``serve`` and ``ui``."""
    from tunesmith.serve.options import ServeOptions

    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--base", help="the base model (default: the runs' own); needed when no run is given")
    if adapter_dir:
        p.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                       help="where /v1/load_lora_adapter may load runs from (repeatable; off without one)")
    p.add_argument("--alias", action="append", default=[], metavar="ALIAS=NAME", help="another name for an adapter")
    p.add_argument("--alias-file", help="{alias: run directory} as JSON, which retrain writes: applied at "
                   "start and followed while serving (default: runs/aliases.json; for ui, DIR/aliases.json)")
    p.add_argument("--store", help="the SQLite store for the request log (default: $TUNESMITH_STORE, else runs/store.sqlite)")
    p.add_argument("--api-key-file", help="admin keys, one ID:KEY or KEY a line (also $TUNESMITH_API_KEYS): "
                   "they may do everything (docs/security.md)")
    p.add_argument("--user-key-file", help="user keys, in the same format (also $TUNESMITH_USER_KEYS): "
                   "inference, and feedback on their own answers")
    p.add_argument("--rater-key-file", help="rater keys, in the same format (also $TUNESMITH_RATER_KEYS): "
                   "chat, the rate page and reading runs; not loading adapters, launching or stopping runs")
    p.add_argument("--redact-pii", action="store_true", help="replace personal data in the request log")
    for name, info in ServeOptions.model_fields.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(info.default), default=info.default,
                       help=info.description)


def _consensus_arguments(p: argparse.ArgumentParser, item: str) -> None:
    """--min-raters and --agreement, as ``store.consensus.Consensus`` takes them."""
    p.add_argument("--min-raters", type=int, default=1,
                   help=f"keep {item} only when at least this many raters rated it (each rater's latest verdict)")
    p.add_argument("--agreement", type=float, default=0.0,
                   help="keep it only when at least this share of its raters gave its verdict (0.66: two in three)")


def _consensus(args):
    from tunesmith.store.consensus import Consensus

    return Consensus(args.min_raters, args.agreement)


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


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _quiet_libraries()
    from tunesmith.stopping import Interrupted, on_sigterm

    # SIGTERM stops every long command as Ctrl-C does, at whatever phase it is in; the servers
    # (serve, ui) shut down through uvicorn's own handler instead.
    stopping = nullcontext() if args.func in (cmd_serve, cmd_ui) else on_sigterm()
    try:
        with stopping:
            return args.func(args)
    except TunesmithError as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as interrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(interrupt, Interrupted) else EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
