"""A real `loramux serve` on a device answering HTTP requests (bench/gpu_check.sh
runs it on CUDA).

It makes a tiny random Llama with a byte-level tokenizer and chat template
and two random adapters (bench/offline_checkpoint.py: no hub, no network),
starts the server on a free port in a process of its own, and checks:

    greedy     a completion (temperature 0, 12 tokens, EOS ignored) equals the
               same prompt through the offline engine on the same device, and
               is the same when asked again
    chat       a chat completion answers with an assistant message
    adapter    an adapter loaded by path (vLLM's /v1/load_lora_adapter) is
               listed in /v1/models and its greedy completion differs from
               the base model's and equals the offline engine's with it
    seeded     two sampled completions with one seed give the same text, one
               with another seed differs

then stops the server (SIGTERM; SIGKILL after 15 s). Exits 1 on any failed
check. Only the standard library speaks HTTP here (urllib).

    python3 bench/cuda_serve_check.py [--device cuda]
    python3 bench/cuda_serve_check.py --device cpu     # the CPU smoke form
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from loramux.bench.common import serve_argv
from loramux.bench.offline_checkpoint import make_adapters, make_checkpoint

MODEL = "tiny"
PROMPT = "The capital of France is"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(base: str, path: str, body: dict | None = None, timeout: float = 60.0) -> dict:
    """GET (body None) or POST JSON; the decoded JSON reply. HTTPError carries the body."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{path}: HTTP {exc.code}: {exc.read()[:500]!r}") from None


def wait_ready(base: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it answered /health")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")


def completion(base: str, model: str, **options) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True, **options}
    reply = call(base, "/v1/completions", body)
    return reply["choices"][0]["text"]


def offline_texts(model_dir: Path, adapter_dir: Path, device: str) -> tuple[str, str]:
    """(base, adapter "ad0") greedy texts of PROMPT from the offline engine."""
    from loramux.server import LLM
    from loramux.server.engine.sampling import SamplingParams

    llm = LLM(model=str(model_dir), dtype="float32", device=device, adapters={"ad0": adapter_dir},
              kv_cache_bytes=4 * 2**20, adapter_pool_bytes=32 * 2**20)
    outs = llm.generate([PROMPT, PROMPT], SamplingParams(max_tokens=12, ignore_eos=True), [None, "ad0"])
    return outs[0].text, outs[1].text


def run_checks(base: str, adapters: dict[str, Path], offline: tuple[str, str]) -> list[str]:
    """The checks against a running server; the names of those that failed."""
    failed = []

    def check(name: str, ok: bool, detail: str) -> None:
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}")
        if not ok:
            failed.append(name)

    greedy = completion(base, MODEL)
    check("greedy completion", greedy == offline[0] and completion(base, MODEL) == greedy and greedy != "",
          f"{greedy!r} (offline engine: {offline[0]!r})")
    chat = call(base, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8, "temperature": 0})
    message = chat["choices"][0]["message"]
    check("chat completion", message["role"] == "assistant" and isinstance(message["content"], str)
          and chat["usage"]["completion_tokens"] > 0, f"{message['content']!r}, usage {chat['usage']}")
    call(base, "/v1/load_lora_adapter", {"lora_name": "ad0", "lora_path": str(adapters["ad0"])})
    listed = [m["id"] for m in call(base, "/v1/models")["data"]]
    tuned = completion(base, "ad0")
    check("adapter completion", "ad0" in listed and tuned == offline[1] and tuned != greedy,
          f"{tuned!r} (offline engine: {offline[1]!r}; models {listed})")
    sampled = dict(temperature=1.0, top_p=0.95, max_tokens=16, seed=1234)
    first, second = completion(base, MODEL, **sampled), completion(base, "ad0", **sampled)
    again = completion(base, MODEL, **sampled)
    other = completion(base, MODEL, **{**sampled, "seed": 4321})
    check("seeded sampling", first == again and first != other,
          f"seed 1234 twice: {first!r} / {again!r}; seed 4321: {other!r}; ad0 with 1234: {second!r}")
    return failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--startup-timeout", type=float, default=90.0)
    args = ap.parse_args(argv)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = make_checkpoint(root / "base")
        adapters = make_adapters(model_dir, root / "adapters", ["ad0", "ad1"])
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = serve_argv("--model", str(model_dir), "--device", args.device,
               "--dtype", "float32", "--data-dir", str(root / "data"), "--port", str(port),
               "--served-model-name", MODEL, "--allowed-adapter-root", str(root / "adapters"),
               "--kv-cache-bytes", "16M", "--adapter-pool-bytes", "64M", "--adapter-host-bytes", "64M",
               "--log-level", "warning")
        log = open(root / "server.log", "w+")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        failed: list[str] = []
        try:
            wait_ready(base, proc, args.startup_timeout)
            print(f"server up on port {port} after {time.perf_counter() - began:.1f} s ({args.device})")
            offline = offline_texts(model_dir, adapters["ad0"], args.device)
            failed = run_checks(base, adapters, offline)
        except Exception as exc:  # report what the server said, then fail the check
            failed = [f"{type(exc).__name__}: {exc}"]
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if failed:
                log.seek(0)
                print("server log (last 40 lines):\n" + "".join(log.readlines()[-40:]))
            log.close()
    verdict = "ok" if not failed else "FAILED: " + "; ".join(failed)
    print(f"serve check on {args.device}: {verdict} ({time.perf_counter() - began:.1f} s)")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
