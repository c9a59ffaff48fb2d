"""Torch work off the engine's thread runs in a thread that ends with it (``apart``).

torch's CPU wheels use GNU OpenMP (libgomp), which gives every thread that starts a parallel region a
pool of worker threads of its own, kept until that thread ends. Once the threads it manages outnumber
the CPUs, libgomp stops letting any pool's workers spin between regions (its "throttled" spin count):
they sleep, and each region wakes them again. The engine's decoding is about a thousand small
parallel regions a token, so on the 2-vCPU Xeon one request of SmolLM2 decoded 2.5x slower (114 against
45 ms a token, in-process) once another thread had run a parallel op and kept its pool: the main
thread casting the model to bfloat16 at start-up (a bfloat16 server's one client got 9.1 tokens/s
against 22.6 in-process), or the thread pool scoring a request. ``OMP_WAIT_POLICY`` cannot help: the
throttled count stays short whatever it says. So the server runs such work (loading the base and the
adapters, following the alias file, scoring) in a thread of its own that ends when the work does, and
its pool ends with it; the engine's thread is then the only one that keeps one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def apart(work: Callable[..., T], *args, **kwargs) -> T:
    """``work(*args, **kwargs)`` in a new thread, waited for: its result, or its exception raised here."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = work(*args, **kwargs)
        except BaseException as err:  # handed to the caller, who sees it as if the work ran here
            outcome["error"] = err

    thread = threading.Thread(target=run, name="tunesmith-apart")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


async def awaited(work: Callable[..., T], *args, **kwargs) -> T:
    """``apart`` from a route: waited for on a thread of starlette's pool, so the event loop goes on."""
    from fastapi.concurrency import run_in_threadpool

    return await run_in_threadpool(apart, work, *args, **kwargs)
