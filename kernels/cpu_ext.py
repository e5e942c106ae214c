"""The compiled CPU ops (kernels/csrc/cpu_ops.cpp): built on this machine,
cached, loaded once.

    ops = cpu_ops(cache)     # the loaded module, or None with the reason in cpu_ops_error()
    python -m loramux.kernels.cpu_ext   # build now (make's install step runs it); exit 1 if it cannot

The build is torch's own extension builder (g++ and ninja, with the flags of
this machine's CPU: -march=native, so the cache is per machine). It lands in
<cache>/cpu_ops/<digest of the source and torch version> (the server's
cache folder, $LORAMUX_CACHE: server/model/loader.cache_root), so an
edited source or another torch builds afresh and a stale build is never
loaded. Nothing is prebuilt. Without a compiler the torch path serves and
the reason is logged once (server/model/attention.py, lora_backend.py);
LORAMUX_CPU_OPS=0 asks for the torch path on purpose.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger("loramux.kernels")

SOURCE = Path(__file__).parent / "csrc" / "cpu_ops.cpp"
_errors: list[str] = []


def build_dir(cache: Path) -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:16]
    return Path(cache) / "cpu_ops" / digest


def _build(cache: Path):
    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise RuntimeError("no C++ compiler (c++) on PATH: install g++ to build the compiled CPU ops")
    where = build_dir(cache)
    where.mkdir(parents=True, exist_ok=True)
    flags = ["-O3", "-march=native", "-fopenmp"]  # OpenMP: at::parallel_for shares torch's thread pool
    return cpp_extension.load(
        name="loramux_cpu_ops", sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
        build_directory=str(where), verbose=False,
    )


def cpu_ops(cache: Path):
    """The compiled ops module, built on first use if the cache lacks it;
    None if it cannot be built or LORAMUX_CPU_OPS=0 (cpu_ops_error says why)."""
    if os.environ.get("LORAMUX_CPU_OPS", "1") == "0":  # read at every call: a test flips it
        _errors.append("LORAMUX_CPU_OPS=0")
        return None
    return _load(Path(cache))


@lru_cache(maxsize=None)
def _load(cache: Path):
    try:
        return _build(cache)
    except Exception as exc:  # a missing compiler, ninja or header: the torch path serves instead
        _errors.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
        log.warning("compiled CPU ops unavailable, the torch path serves: %s", _errors[-1])
        return None


def one_torch_thread() -> None:
    """The calling thread runs torch's ops on itself alone from now on, with no
    OpenMP team of its own (server/compute_threads.py says why a server's
    helper threads must not keep one). Needs the compiled ops; without them
    the thread is left as it is."""
    from loramux.server.model.loader import cache_root

    torch.get_num_threads()  # torch sets a thread's team size on its first op: let it, then override
    ops = cpu_ops(cache_root())
    if ops is not None:
        ops.set_thread_parallelism(1)


def cpu_ops_error() -> str | None:
    """Why cpu_ops() is None (after it was called), else None."""
    return _errors[-1] if _errors else None


def main() -> int:
    from loramux.server.model.loader import cache_root

    ops = cpu_ops(cache_root())
    if ops is None:
        print(f"compiled CPU ops: not built ({cpu_ops_error()})", file=sys.stderr)
        return 1
    print(f"compiled CPU ops: {build_dir(cache_root())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
