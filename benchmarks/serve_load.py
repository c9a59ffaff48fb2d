"""`tunesmith serve` under load, against a naive server that answers one request at a time.

    python benchmarks/serve_load.py                 # the bundled SmolLM2 with two LoRA adapters
    python benchmarks/serve_load.py --tiny          # a tiny Llama from a config: a smoke run (seconds)
    python benchmarks/serve_load.py --clients 1,4,16 --requests 32 --seconds 60 --max-tokens 32

Both servers run in their own process on 127.0.0.1, on the same base model with the same two
adapters (random LoRA weights, saved as runs the way `tunesmith train` saves them). The naive one
is the obvious FastAPI route: one lock, ``set_adapter``, ``model.generate`` per request. For each
number of concurrent clients, each client sends greedy completions one after another, the requests
alternating between the two adapters, until the level has sent ``--requests`` requests or run
``--seconds`` seconds. Printed per server and level: requests/s, generated tokens/s (from the
responses' usage), p50/p95 latency, and tokens/s as a share of the decode roofline at that many rows
(``benchmarks/limits.py``: this machine's read bandwidth and float32 matmul peak, measured first, the
model's float32 weights, rows = clients up to the server's --max-batch of 16); the last line is the
ratio of the two servers at the highest level.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

PROMPTS = ["honestly the film is", "the plot of this movie was", "to me the ending felt", "overall the cast is",
           "i think this story is", "as a whole the script was", "sadly the picture is", "the movie is a"]
ADAPTERS = ("alpha", "beta")
MAX_BATCH = 16


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama built from a config, not SmolLM2")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated")
    parser.add_argument("--requests", type=int, default=32, help="requests per level at most")
    parser.add_argument("--seconds", type=float, default=60, help="seconds per level at most")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--serve", nargs=3, metavar=("KIND", "RUNS_DIR", "PORT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


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
    """One request at a time: pick the adapter, ``generate``, answer."""
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


def serve(kind: str, runs_dir: Path, port: int) -> None:
    """The child process: one server, in the foreground."""
    import uvicorn

    from tunesmith.serve.options import ServeOptions
    from tunesmith.serve.server import build_server

    runs = {name: runs_dir / name for name in ADAPTERS}
    if kind == "naive":
        uvicorn.run(naive_app(runs), host="127.0.0.1", port=port, log_level="warning")
        return
    options = ServeOptions(max_concurrent=256, max_batch=MAX_BATCH)
    build_server(runs, options=options, store=runs_dir / "store.sqlite").run("127.0.0.1", port)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(kind: str, runs_dir: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, str(runs_dir), str(port)],
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the {kind} server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"the {kind} server did not start in 600 s")


async def load(url: str, clients: int, requests: int, seconds: float, max_tokens: int) -> dict:
    """``clients`` concurrent clients until ``requests`` are answered or ``seconds`` pass."""
    import httpx

    latencies, tokens = [], 0
    sent = 0
    started = time.perf_counter()

    async def client(http: httpx.AsyncClient):
        nonlocal sent, tokens
        while sent < requests and time.perf_counter() - started < seconds:
            n, sent = sent, sent + 1
            body = {"model": ADAPTERS[n % 2], "prompt": PROMPTS[n % len(PROMPTS)], "max_tokens": max_tokens,
                    "temperature": 0}
            t0 = time.perf_counter()
            response = await http.post(url + "/v1/completions", json=body, timeout=seconds + 600)
            response.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            tokens += response.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient() as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - started
    latencies.sort()
    return {"requests": len(latencies), "req_s": len(latencies) / wall, "tok_s": tokens / wall,
            "p50_s": statistics.median(latencies),
            "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]}


def roofline_per_level(model: str, levels: list[int], max_tokens: int) -> dict:
    """The float32 decode roofline's tokens/s for each number of clients, and a line saying what it rests on."""
    from limits import decode_roofline, decode_terms, matmul_peak, memory_bandwidth

    from tunesmith.model import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(model))
    prompt = statistics.mean(len(tokenizer(p).input_ids) for p in PROMPTS)
    context = prompt + max_tokens / 2
    bandwidth, peak, terms = memory_bandwidth()["read"], matmul_peak([512, 1024])["float32"], decode_terms(model)
    found = {c: decode_roofline(terms, min(c, MAX_BATCH), context, bandwidth, peak, 4)["tokens_per_s"]
             for c in levels}
    found["line"] = (f"roofline (float32 weights, context {context:.0f}): read bandwidth {bandwidth:.1f} GB/s, "
                     f"matmul peak {peak:.0f} GFLOP/s; "
                     + ", ".join(f"{c} clients {found[c]:.0f} tokens/s" for c in levels))
    return found


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.serve:
        kind, runs_dir, port = args.serve
        serve(kind, Path(runs_dir), int(port))
        return
    levels = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory(prefix="tunesmith-serve-load-") as tmp:
        root = Path(tmp)
        model = args.model
        if args.tiny:
            from conftest import make_model_dir

            model = str(make_model_dir(root / "tiny-llama"))
        make_runs(root, model)
        roofline = roofline_per_level(model, levels, args.max_tokens)
        results = {}
        for kind in ("tunesmith", "naive"):
            proc, url = start(kind, root)
            try:
                for clients in levels:
                    results[kind, clients] = asyncio.run(
                        load(url, clients, args.requests, args.seconds, args.max_tokens))
            finally:
                proc.terminate()
                proc.wait(30)
    print(f"model: {'tiny Llama (2 layers, width 32)' if args.tiny else args.model}; two LoRA adapters; "
          f"max_tokens {args.max_tokens}, greedy; at most {args.requests} requests or {args.seconds:g} s per level")
    print(roofline["line"])
    print("| server | clients | requests | requests/s | tokens/s | share of roofline | p50 s | p95 s |")
    print("|---|---|---|---|---|---|---|---|")
    for (kind, clients), r in results.items():
        print(f"| {kind} | {clients} | {r['requests']} | {r['req_s']:.2f} | {r['tok_s']:.1f} | "
              f"{r['tok_s'] / roofline[clients]:.1%} | {r['p50_s']:.3f} | {r['p95_s']:.3f} |")
    top = max(levels)
    ours, naive = results["tunesmith", top], results["naive", top]
    print(f"ratio tunesmith/naive at {top} clients: requests/s {ours['req_s'] / naive['req_s']:.2f}x, "
          f"tokens/s {ours['tok_s'] / naive['tok_s']:.2f}x, p95 latency {ours['p95_s'] / naive['p95_s']:.2f}x")


if __name__ == "__main__":
    main()
