"""`tunesmith serve` under load, against a naive server that answers one request at a time, and
optionally against llama.cpp's server.

    python benchmarks/serve_load.py                 # the bundled SmolLM2 with two LoRA adapters
    python benchmarks/serve_load.py --tiny          # a tiny Llama from a config: a smoke run (seconds)
    python benchmarks/serve_load.py --clients 1,4,16 --requests 32 --seconds 60 --max-tokens 32
    python benchmarks/serve_load.py --against llamacpp   # and llama-server (bash benchmarks/llamacpp_setup.sh)

Every server runs in its own process on 127.0.0.1, on the same base model with the same adapters
(random LoRA weights, saved as runs the way `tunesmith train` saves them). The naive one is the
obvious FastAPI route: one lock, ``set_adapter``, ``model.generate`` per request. For each adapter
mix (``--adapters``: 1, every request to one adapter; 2, requests alternating between two) and each
number of concurrent clients, each client sends greedy streamed completions one after another until
the level has sent ``--requests`` requests or run ``--seconds`` seconds. Printed per server, mix and
level: requests/s, generated tokens/s (from the responses' usage), time to the first token (p50) and
latency (p50/p95/p99), and tokens/s as a share of the decode roofline at that many rows
(``benchmarks/limits.py``: this machine's read bandwidth and float32 matmul peak, measured first, the
model's weights at the server's bytes per weight, rows = clients up to 16); the last lines are the
ratios of the servers at the highest level.

``--against llamacpp`` adds llama.cpp's ``llama-server`` on GGUF files that tunesmith writes at
float16 (``--llamacpp-dtype float32`` for float32): for one adapter the run's merged export
(``tunesmith export --format gguf``); for two, the base model with both adapters as GGUF LoRAs
(llama.cpp's ``convert_lora_to_gguf.py``), each request choosing its adapter with the ``lora`` field.
Its settings: threads = CPU cores, one slot per client of the highest level (``--parallel``),
continuous batching.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

PROMPTS = ["honestly the film is", "the plot of this movie was", "to me the ending felt", "overall the cast is",
           "i think this story is", "as a whole the script was", "sadly the picture is", "the movie is a"]
ADAPTERS = ("alpha", "beta")
MAX_BATCH = 16
LLAMACPP_DIR = Path(os.environ.get("LLAMACPP_DIR", ROOT / ".llamacpp"))
GGUF_TYPES = {"float16": ("f16", 2), "float32": ("f32", 4)}  # --llamacpp-dtype: the converter's name, bytes/weight
SLOT_CONTEXT = 256  # llama.cpp's context per slot: a prompt of about 8 tokens and --max-tokens, with room


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama built from a config, not SmolLM2")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated")
    parser.add_argument("--adapters", help="adapter mixes, comma-separated: 1 (one adapter), 2 (two, alternating); "
                        "default 2, or 1,2 with --against")
    parser.add_argument("--requests", type=int, default=32, help="requests per level at most")
    parser.add_argument("--seconds", type=float, default=60, help="seconds per level at most")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="tunesmith's serving dtype (serve --dtype; the naive server stays float32). auto: "
                        "bfloat16 where the CPU has it natively, its best there at 16 clients and level with "
                        "float32 for one (docs/serving.md, run D); float32 elsewhere")
    parser.add_argument("--against", choices=["llamacpp"], help="also load llama.cpp's llama-server")
    parser.add_argument("--servers", default="tunesmith,naive,llama.cpp",
                        help="which of the servers to load, comma-separated (llama.cpp only with --against)")
    parser.add_argument("--llamacpp-dtype", default="float16", choices=list(GGUF_TYPES),
                        help="the GGUF files' type for llama.cpp: float16, its usual (2 bytes a weight, as tunesmith's "
                        "bfloat16), or float32 (to set it beside tunesmith at float32)")
    parser.add_argument("--llama-server", help="the llama-server binary (default: $LLAMA_SERVER, else "
                        ".llamacpp/bin/llama-server, else llama-server on PATH)")
    parser.add_argument("--llama-cpp-source", help="llama.cpp's source tree, for convert_lora_to_gguf.py "
                        "(default: .llamacpp/llama.cpp, which llamacpp_setup.sh links)")
    parser.add_argument("--serve", nargs=4, metavar=("KIND", "RUNS_DIR", "PORT", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.adapters = args.adapters or ("1,2" if args.against else "2")
    mixes = [int(m) for m in args.adapters.split(",")]
    if not mixes or any(m not in (1, 2) for m in mixes):
        parser.error(f"--adapters {args.adapters}: expected 1, 2 or 1,2")
    args.mixes, args.levels = mixes, [int(c) for c in args.clients.split(",")]
    return args


def make_runs(root: Path, model: str) -> dict[str, Path]:
    """Two LoRA runs on ``model``, with random adapter weights, in ``root``."""
    import torch
    from conftest import review_rows, write_config, write_jsonl
    from peft import LoraConfig, get_peft_model

    from tunesmith.model import load_model, resolve_model
    from tunesmith.store import Run

    source = resolve_model(model)
    data = write_jsonl(root / "data.jsonl", review_rows(20))
    runs = {}
    for seed, name in enumerate(ADAPTERS, 1):
        run = root / name
        run.mkdir()
        config = write_config(root / f"{name}.yaml", Path(model),
                              {"path": str(data), "format": "classification",
                               "columns": {"text": "review", "label": "sentiment"}}, output={"dir": str(run)})
        (run / "config.yaml").write_text(config.read_text())
        torch.manual_seed(seed)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(load_model(source), lora).save_pretrained(run / "adapter")
        Run(run).set_status("complete")
        runs[name] = run
    return runs


def naive_app(runs: dict[str, Path]):
    """One request at a time: pick the adapter, ``generate``, answer (never streamed)."""
    import threading

    import torch
    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from peft import PeftModel

    from tunesmith.model import load_model, load_tokenizer
    from tunesmith.serve.adapters import read_run

    first = read_run(runs[ADAPTERS[0]])
    tokenizer = load_tokenizer(first.source)
    model = PeftModel.from_pretrained(load_model(first.source), first.weights, adapter_name=ADAPTERS[0]).eval()
    for name in ADAPTERS[1:]:
        model.load_adapter(read_run(runs[name]).weights, adapter_name=name)
    lock = threading.Lock()
    app = FastAPI()

    def generate(body: dict) -> dict:
        ids = torch.tensor([tokenizer(body["prompt"]).input_ids])
        with lock, torch.no_grad():
            model.set_adapter(body["model"])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=body["max_tokens"], pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:]
        return {"choices": [{"index": 0, "text": tokenizer.decode(new, skip_special_tokens=True)}],
                "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": len(new)}}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(body: dict):
        return await run_in_threadpool(generate, body)

    return app


def serve(kind: str, runs_dir: Path, port: int, dtype: str) -> None:
    """The child process: one server, in the foreground."""
    import uvicorn

    from tunesmith.serve.options import ServeOptions
    from tunesmith.serve.server import build_server

    runs = {name: runs_dir / name for name in ADAPTERS}
    if kind == "naive":
        uvicorn.run(naive_app(runs), host="127.0.0.1", port=port, log_level="warning")
        return
    options = ServeOptions(max_concurrent=256, max_batch=MAX_BATCH, dtype=dtype)
    build_server(runs, options=options, store=runs_dir / "store.sqlite").run("127.0.0.1", port)


@dataclass(frozen=True)
class Target:
    """A server under load: how to start it for an adapter mix, and how a request names its adapter."""
    name: str
    element_bytes: int  # bytes per weight it decodes with, for the roofline
    command: Callable[[Path, int, int], list[str]]  # (work dir, port, adapters) -> argv
    adapter_fields: Callable[[int, int], dict]  # (adapters, request number) -> fields of the request body
    note: str = ""  # printed above the table: what a reader needs to read its rows


def ours(kind: str, dtype: str = "float32", note: str = "") -> Target:
    """tunesmith's server or the naive one: both adapters loaded, the request's ``model`` picks one."""
    from tunesmith.serve.options import ServeOptions

    element_bytes = ServeOptions(dtype=dtype).weights_dtype().itemsize
    dtype = {2: "bfloat16", 4: "float32"}[element_bytes]  # auto resolved here, so the note names what ran
    return Target(kind, element_bytes,
                  lambda root, port, mix: [sys.executable, __file__, "--serve", kind, str(root), str(port), dtype],
                  lambda mix, n: {"model": ADAPTERS[n % mix]}, note or f"{kind}: {dtype} weights")


def find_llama_server(given: str | None) -> Path:
    """The llama-server binary, or a SystemExit saying how to get one."""
    candidates = [given] if given else [os.environ.get("LLAMA_SERVER"), LLAMACPP_DIR / "bin" / "llama-server",
                                         shutil.which("llama-server")]
    for candidate in filter(None, candidates):
        if Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    looked = given or f"$LLAMA_SERVER, {LLAMACPP_DIR / 'bin' / 'llama-server'} and PATH"
    raise SystemExit(f"serve_load.py --against llamacpp: llama-server not found (looked at {looked}). "
                     "Build it with `bash benchmarks/llamacpp_setup.sh`, or give --llama-server PATH.")


def find_lora_converter(given: str | None) -> Path:
    """llama.cpp's convert_lora_to_gguf.py, or a SystemExit saying how to get it."""
    source = Path(given) if given else LLAMACPP_DIR / "llama.cpp"
    script = source / "convert_lora_to_gguf.py"
    if not script.is_file():
        raise SystemExit(f"serve_load.py --against llamacpp --adapters 2: {script} not found; two adapters in "
                         "llama.cpp need its LoRA converter. Run `bash benchmarks/llamacpp_setup.sh`, give "
                         "--llama-cpp-source DIR, or run --adapters 1.")
    return script


def llamacpp_files(root: Path, model: str, mixes: list[int], converter: Path | None,
                   dtype: str = "float16") -> dict[str, Path]:
    """The GGUF files llama.cpp serves, all of ``dtype``: ``merged`` (the first run with its adapter
    merged, as `tunesmith export --format gguf --dtype DTYPE` writes it) for one adapter; ``base`` and
    one GGUF LoRA per run for two."""
    from tunesmith.export import export_run
    from tunesmith.export.gguf_file import write_gguf
    from tunesmith.model import load_model, load_tokenizer, resolve_model

    files = {}
    if 1 in mixes:
        files["merged"] = export_run(root / ADAPTERS[0], "gguf", root / f"{ADAPTERS[0]}-merged.gguf", dtype)
    if 2 in mixes:
        source = resolve_model(model)
        files["base"] = write_gguf(load_model(source), load_tokenizer(source), root / "base.gguf", dtype)
        for name in ADAPTERS:
            out = root / f"{name}-lora.gguf"
            done = subprocess.run([sys.executable, str(converter), "--base", source, "--outtype", GGUF_TYPES[dtype][0],
                                   "--outfile", str(out), str(root / name / "adapter")],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"convert_lora_to_gguf.py failed on {name}:\n{done.stderr[-2000:]}")
            files[name] = out
    return files


def llamacpp(binary: Path, files: dict[str, Path], slots: int, dtype: str = "float16") -> Target:
    """llama-server at its best CPU settings: a thread per core for decoding and for prompts, a slot
    per concurrent client, continuous batching. Two adapters are loaded unapplied and each request
    applies its own (llama.cpp's per-request ``lora`` field)."""
    cores = str(os.cpu_count())

    def command(root: Path, port: int, mix: int) -> list[str]:
        argv = [str(binary), "--host", "127.0.0.1", "--port", str(port), "--threads", cores,
                "--threads-batch", cores, "--parallel", str(slots), "--ctx-size", str(slots * SLOT_CONTEXT),
                "--cont-batching"]
        if mix == 1:
            return argv + ["--model", str(files["merged"])]
        loras = [a for name in ADAPTERS for a in ("--lora", str(files[name]))]
        return argv + ["--model", str(files["base"]), *loras, "--lora-init-without-apply"]

    def adapter_fields(mix: int, n: int) -> dict:
        return {} if mix == 1 else {"lora": [{"id": n % mix, "scale": 1.0}]}

    note = (f"llama.cpp: {binary} --threads {cores} --parallel {slots} --cont-batching, {dtype} GGUF files written "
            "by tunesmith; one adapter: the run merged into the base (tunesmith export); two: GGUF LoRAs on the base, "
            "chosen per request; llama.cpp decodes only requests with the same adapters in one step "
            "(can_batch_with), so the two take turns where tunesmith decodes them in one batch")
    return Target("llama.cpp", GGUF_TYPES[dtype][1], command, adapter_fields, note)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(target: Target, root: Path, mix: int) -> tuple[subprocess.Popen, str]:
    """Start ``target`` and wait until its /health answers 200; its output goes to a log in ``root``."""
    import httpx

    port = free_port()
    log = root / f"{target.name}-{mix}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(target.command(root, port, mix), stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise SystemExit(f"the {target.name} server exited with status {proc.returncode}:\n{tail}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise SystemExit(f"the {target.name} server did not start in 600 s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, and SIGKILL if it has not exited 30 s later."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def complete(http, url: str, body: dict, timeout: float) -> tuple[float | None, int]:
    """One streamed completion: seconds to its first text (None if none came) and tokens generated.
    A server that answers with plain JSON (the naive one) gives its first text with its last."""
    t0, first, tokens, chunks = time.perf_counter(), None, None, 0
    async with http.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as response:
        response.raise_for_status()
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            answer = json.loads(await response.aread())
            return time.perf_counter() - t0, answer["usage"]["completion_tokens"]
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if any(choice.get("text") for choice in chunk.get("choices") or []):
                chunks += 1
                first = first if first is not None else time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, chunks if tokens is None else tokens


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def load(url: str, target: Target, mix: int, clients: int, requests: int, seconds: float,
               max_tokens: int) -> dict:
    """``clients`` concurrent clients until ``requests`` are answered or ``seconds`` pass. A request that
    fails is counted (``errors``, the first error's text kept), not retried: the level goes on."""
    import httpx

    latencies, firsts, tokens, errors = [], [], 0, []
    sent = 0
    started = time.perf_counter()

    async def client(http: httpx.AsyncClient):
        nonlocal sent, tokens
        while sent < requests and time.perf_counter() - started < seconds:
            n, sent = sent, sent + 1
            body = {"prompt": PROMPTS[n % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}, **target.adapter_fields(mix, n)}
            t0 = time.perf_counter()
            try:
                first, generated = await complete(http, url, body, seconds + 600)
            except httpx.HTTPError as error:
                errors.append(f"{type(error).__name__}: {error}")
                continue
            latencies.append(time.perf_counter() - t0)
            if first is not None:
                firsts.append(first)
            tokens += generated

    # A connection per request: llama.cpp's HTTP server closes a kept-alive connection after a few
    # requests, and a request sent on it as it closes fails unanswered (one in 16 here); a fresh
    # localhost connection costs well under a millisecond, the same for every server.
    async with httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - started
    nan = float("nan")
    return {"requests": len(latencies), "req_s": len(latencies) / wall, "tok_s": tokens / wall,
            "ttft_p50_s": statistics.median(firsts) if firsts else nan,
            "p50_s": statistics.median(latencies) if latencies else nan,
            "p95_s": percentile(latencies, 0.95) if latencies else nan,
            "p99_s": percentile(latencies, 0.99) if latencies else nan,
            "errors": len(errors), "first_error": errors[0] if errors else ""}


def roofline_per_level(model: str, levels: list[int], max_tokens: int, element_bytes: list[int]) -> dict:
    """The decode roofline's tokens/s for each number of clients and bytes per weight, and a line saying
    what it rests on."""
    from limits import decode_roofline, decode_terms, matmul_peak, memory_bandwidth

    from tunesmith.model import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(model))
    prompt = statistics.mean(len(tokenizer(p).input_ids) for p in PROMPTS)
    context = prompt + max_tokens / 2
    bandwidth, peak, terms = memory_bandwidth()["read"], matmul_peak([512, 1024])["float32"], decode_terms(model)
    found = {(c, b): decode_roofline(terms, min(c, MAX_BATCH), context, bandwidth, peak, b)["tokens_per_s"]
             for c in levels for b in element_bytes}
    found["line"] = (f"roofline (context {context:.0f}): read bandwidth {bandwidth:.1f} GB/s, float32 matmul peak "
                     f"{peak:.0f} GFLOP/s; " + "; ".join(
                         f"{b}-byte weights: " + ", ".join(f"{c} clients {found[c, b]:.0f} tokens/s" for c in levels)
                         for b in element_bytes))
    return found


def print_report(args, targets: list[Target], results: dict, roofline: dict) -> None:
    model = "tiny Llama (2 layers, width 32)" if args.tiny else args.model
    print(f"model: {model}; adapter mixes {args.adapters} (1: one LoRA adapter; 2: two, alternating); "
          f"max_tokens {args.max_tokens}, greedy, streamed; at most {args.requests} requests or "
          f"{args.seconds:g} s per level")
    print(roofline["line"])
    element_bytes = {t.name: t.element_bytes for t in targets}
    for target in targets:
        if target.note:
            print(target.note)
    print("| server | adapters | clients | requests | failed | requests/s | tokens/s | share of roofline "
          "| first token p50 s | p50 s | p95 s | p99 s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (name, mix, clients), r in results.items():
        share = r["tok_s"] / roofline[clients, element_bytes[name]]
        print(f"| {name} | {mix} | {clients} | {r['requests']} | {r['errors']} | {r['req_s']:.2f} | {r['tok_s']:.1f} "
              f"| {share:.1%} | {r['ttft_p50_s']:.3f} | {r['p50_s']:.3f} | {r['p95_s']:.3f} | {r['p99_s']:.3f} |")
    for (name, mix, clients), r in results.items():
        if r["errors"]:
            print(f"{name}, {mix} adapter(s), {clients} clients: {r['errors']} failed; the first: {r['first_error']}")
    top = max(args.levels)
    for mix in args.mixes:
        first = results.get(("tunesmith", mix, top))
        for other in targets:
            theirs = results.get((other.name, mix, top))
            if other.name == "tunesmith" or first is None or theirs is None:
                continue
            theirs = results[other.name, mix, top]
            print(f"ratio tunesmith/{other.name}, {mix} adapter(s), {top} clients: requests/s "
                  f"{first['req_s'] / theirs['req_s']:.2f}x, tokens/s {first['tok_s'] / theirs['tok_s']:.2f}x, "
                  f"first token p50 {first['ttft_p50_s'] / theirs['ttft_p50_s']:.2f}x, "
                  f"p99 latency {first['p99_s'] / theirs['p99_s']:.2f}x")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.serve:
        kind, runs_dir, port, dtype = args.serve
        serve(kind, Path(runs_dir), int(port), dtype)
        return
    wanted = set(args.servers.split(","))
    targets = [ours("tunesmith", args.dtype),
               ours("naive", note="naive: float32, does not stream, so its time to first token is its latency")]
    targets = [t for t in targets if t.name in wanted]
    if args.against:  # before any work: a missing binary is said at once
        binary = find_llama_server(args.llama_server)
        converter = find_lora_converter(args.llama_cpp_source) if 2 in args.mixes else None
    with tempfile.TemporaryDirectory(prefix="tunesmith-serve-load-") as tmp:
        root = Path(tmp)
        model = args.model
        if args.tiny:
            from conftest import make_model_dir

            model = str(make_model_dir(root / "tiny-llama"))
        make_runs(root, model)
        if args.against:
            if "llama.cpp" in wanted:
                files = llamacpp_files(root, model, args.mixes, converter, args.llamacpp_dtype)
                targets.append(llamacpp(binary, files, max(args.levels), args.llamacpp_dtype))
        roofline = roofline_per_level(model, args.levels, args.max_tokens, sorted({t.element_bytes for t in targets}))
        results = {}
        for target in targets:
            for mix in args.mixes:
                proc, url = start(target, root, mix)
                try:
                    for clients in args.levels:
                        r = results[target.name, mix, clients] = asyncio.run(
                            load(url, target, mix, clients, args.requests, args.seconds, args.max_tokens))
                        print(f"{target.name}, {mix} adapter(s), {clients} clients: {r['requests']} answered, "
                              f"{r['errors']} failed, {r['tok_s']:.1f} tokens/s", file=sys.stderr, flush=True)
                        if r["errors"]:  # the server's own account, before its folder goes
                            log = (root / f"{target.name}-{mix}.log").read_text(errors="replace").splitlines()
                            print("\n".join(log[-30:]), file=sys.stderr, flush=True)
                finally:
                    stop(proc)
    print_report(args, targets, results, roofline)


if __name__ == "__main__":
    main()
