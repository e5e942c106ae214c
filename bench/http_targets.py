"""Issue 15's HTTP targets in one run: `loramux serve` on the default model
as it ships ("after") and with LORAMUX_CPU_OPS=0 ("before": every op on its
torch path), one server at a time, the same requests to both
(bench/load_test.py's workload, streamed completions, EOS ignored):

    row                                               target
    one request alone, output tok/s                   >= 60
    16 adapters (zipf), 32 concurrent / base model    >= 0.85
    inter-token latency p50 at 32 concurrent          no worse than before

    .venv/bin/python -P -m loramux.bench.http_targets [--dtype bfloat16] [--requests 64] [--json F]

The many-adapter, cold-load and DoRA rows are offline (bench/many_adapters.py,
bench/step_targets.py); vLLM-CPU is bench/vllm_cpu.sh.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from loramux.bench.common import serve_argv
from loramux.bench.load_test import Arrivals, Length, Target, Workload, run_load, summarize, upload_adapters
from loramux.bench.scaleout import free_port, wait_healthy
from loramux.bench.synthetic import make_peft_adapters
from loramux.server.model.loader import resolve_model_dir

SERVED = "base"
NAMES = [f"lora-{i}" for i in range(16)]


def measure(env: dict[str, str], folders: list[Path], args) -> dict[str, dict]:
    """The three workloads against one fresh server (its own data dir)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="loramux-http-") as data:
        argv = serve_argv("--port", str(port), "--data-dir", data,
                "--dtype", args.dtype, "--served-model-name", SERVED, "--max-loras-per-batch", "16",
                "--max-lora-rank", "16", "--max-num-seqs", "32", "--log-level", "warning")
        proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_healthy(url)
            with httpx.Client(base_url=url, timeout=120) as client:
                upload_adapters(client, NAMES, folders)
            target = Target(url, SERVED)

            def run(adapters, n, concurrency, prompt, output, seed=0) -> dict:
                specs = Workload(n, tuple(adapters), "zipf", 1.0, Length("fixed", (prompt,)),
                                 Length("fixed", (output,)), seed).requests()
                warm = Workload(4, tuple(adapters), "zipf", 1.0, Length("fixed", (prompt,)),
                                Length("fixed", (8,)), seed + 1).requests()
                asyncio.run(run_load(target, warm, Arrivals("closed", concurrency=4), duration=120,
                                     drain_timeout=120, progress=False))
                results, wall = asyncio.run(run_load(target, specs, Arrivals("closed", concurrency=concurrency),
                                                     duration=600, drain_timeout=300, progress=False))
                return summarize(results, wall, None)

            return {"single": run([], 3, 1, 16, 128),
                    "base32": run([], args.requests, 32, 64, 64),
                    "lora32": run(NAMES, args.requests, 32, 64, 64)}
        finally:
            proc.terminate()
            proc.wait(60)


def rows(t: dict) -> list[tuple[str, float, str]]:
    def tps(run):
        return run["output_throughput"]

    def single(run):  # one request's own decode speed: 1 / its time per output token
        return 1.0 / run["tpot_s"]["p50"]

    out = []
    for label, key in (("after", "after"), ("before", "before")):
        r = t[key]
        out += [(f"one request alone, output tok/s ({label})", single(r["single"]), ">= 60" if key == "after" else ""),
                (f"16 adapters zipf, 32 concurrent, tok/s ({label})", tps(r["lora32"]), ""),
                (f"base model, 32 concurrent, tok/s ({label})", tps(r["base32"]), ""),
                (f"16 adapters / base ({label})", tps(r["lora32"]) / tps(r["base32"]),
                 ">= 0.85" if key == "after" else ""),
                (f"ITL p50 ms, 16 adapters at 32 concurrent ({label})", r["lora32"]["itl_s"]["p50"] * 1e3, "")]
    out.append(("16 adapters tok/s after / before", tps(t["after"]["lora32"]) / tps(t["before"]["lora32"]), ""))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--requests", type=int, default=64, help="requests of each 32-concurrent run")
    parser.add_argument("--json", default=None, help="also write every summary here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="loramux-http-adapters-") as tmp:
        folders = list(make_peft_adapters(resolve_model_dir(None), Path(tmp), NAMES, [16], seed=0).values())
        report = {"after": measure({}, folders, args), "before": measure({"LORAMUX_CPU_OPS": "0"}, folders, args)}
    failed = sum(run["failed"] for side in report.values() for run in side.values())
    print(f"{args.dtype}, {args.requests} requests of 64 in / 64 out at 32 concurrent; "
          f"one request: 16 in / 128 out; {failed} requests failed")
    for name, value, target in rows(report):
        print(f"  {name:56} {value:9.3f}  {target}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
