"""Which threads of a server run torch's parallel ops: the engine thread only.

OpenMP keeps a team of worker threads for every thread that ever ran a
parallel region (torch's ops over more than ~32k elements do). A second team
beside the engine thread's leaves more OpenMP threads than CPUs, and libgomp
then lets its workers spin only briefly before they sleep, so each of a
decode step's hundreds of parallel regions waits for a wake-up. Measured on
2 cores, default model, one stream over HTTP: 35-38 tok/s with a second team
(the model loaded on the main thread, or one rank-64 upload validated in a
helper thread), 66 without.

    run_in_passing_thread(fn)   fn() in a thread that ends, and its team with it
    helper_executor()           the event loop's executor for blocking work
                                (asyncio.to_thread): its threads run torch on
                                one thread, so they never start a team

(The adapter pool's prefetch worker does the same: kernels/cpu_ext.one_torch_thread.)
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from loramux.kernels.cpu_ext import one_torch_thread

T = TypeVar("T")


def run_in_passing_thread(fn: Callable[[], T], name: str = "loramux-passing") -> T:
    """fn()'s result (or its exception), computed in a thread that has ended by the time it returns."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((fn(), None))
        except BaseException as exc:  # handed to the caller's thread
            outcome.append((None, exc))

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join()
    result, error = outcome[0]
    if error is not None:
        raise error
    return result


def helper_executor() -> ThreadPoolExecutor:
    """asyncio's default executor, sized as asyncio sizes it, whose threads run torch on one thread."""
    return ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4), thread_name_prefix="loramux-helper",
                              initializer=one_torch_thread)
