"""`loramux ray-serve` as an operator runs it: a process joined to a Ray cluster
(`ray start --head`, small and bounded), serving the tiny model; SIGTERM drains
the whole application: requests in flight (running and waiting) finish whole,
new ones get 503 `draining`, and the process exits 0."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

from helpers.live_server import AUTH, BASE, KEY, ROOT, assert_error, free_port, make_api_files, wait_for

pytestmark = pytest.mark.slow

PROMPT = "The quick brown fox"
TOKENS = 480  # the tiny model's context is 512: three of these, one at a time, take seconds


# a local test cluster: no token to hand around (Ray's auth is for clusters reachable by others)
RAY_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def ray_head(tmp_path):
    ray = str(Path(sys.executable).parent / "ray")
    port = free_port()
    started = subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                              "--object-store-memory=100000000", "--include-dashboard=false",
                              "--disable-usage-stats"], env=RAY_ENV, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray, "stop", "--force"], env=RAY_ENV, capture_output=True, timeout=120)


def test_sigterm_drains_the_application(tmp_path, ray_head):
    files = make_api_files(tmp_path)
    port = free_port()
    log = open(tmp_path / "ray-serve.log", "w+")
    env = dict(RAY_ENV)
    env.pop("LORAMUX_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "loramux.server", "ray-serve", "--ray-address", ray_head, "--port", str(port),
         "--model", str(files / "base"), "--dtype", "float32", "--adapter-dir", str(tmp_path / "store"),
         "--data-dir", str(tmp_path / "data"),
         "--api-key", KEY, "--served-model-name", BASE, "--kv-cache-bytes", "8M", "--adapter-pool-bytes", "4M",
         "--num-replicas", "1", "--replica-cpus", "1", "--max-num-seqs", "1", "--drain-timeout", "120"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)

    def output() -> str:
        log.flush()
        log.seek(0)
        return log.read()[-4000:]

    try:
        url = f"http://127.0.0.1:{port}"
        http = httpx.Client(base_url=url, headers=AUTH, timeout=60)

        def healthy() -> bool:
            assert proc.poll() is None, output()
            try:
                return http.get("/health").status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_for(healthy, timeout=180), output()
        # the process has deployed (serve.run returned): what an operator's SIGTERM meets in service
        assert wait_for(lambda: "loramux on Ray Serve:" in output(), timeout=60), output()
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        first_chunk = threading.Event()
        # a stream's headers come once the replica has taken the request (queued or running): the
        # signal must find all three in flight, not race a thread whose request is still on its way
        accepted = threading.Semaphore(0)
        finished: dict[int, object] = {}

        def stream(i: int):
            try:
                chunks = iter(client.completions.create(model=BASE, prompt=PROMPT, max_tokens=TOKENS, temperature=0,
                                                        extra_body={"ignore_eos": True}, stream=True,
                                                        stream_options={"include_usage": True}))
                accepted.release()
                parts = [next(chunks)]
                if i == 0:
                    first_chunk.set()
                parts += list(chunks)
                finished[i] = (parts[-1].usage.completion_tokens, [p.choices[0].finish_reason for p in parts
                                                                   if p.choices and p.choices[0].finish_reason])
            except Exception as exc:
                finished[i] = exc

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]  # one runs, two wait
        for t in threads:
            t.start()
        assert all(accepted.acquire(timeout=60) for _ in threads), output()
        assert first_chunk.wait(60), output()
        assert not any(isinstance(f, Exception) for f in finished.values()), finished
        proc.send_signal(signal.SIGTERM)

        refused = []

        def new_request_refused() -> bool:
            # a request the replica answers at once (a completion would queue behind the streams, and
            # one sent just before the drain could outlast the whole application)
            r = http.get("/v1/models")
            if r.status_code == 503:
                refused.append(assert_error(r, 503))
                return True
            assert r.status_code == 200, r.text  # before the signal reached the ingress
            return False

        assert wait_for(new_request_refused, timeout=30), output()
        assert refused[0]["code"] == "draining"
        r = http.post("/v1/completions", json={"model": BASE, "prompt": PROMPT, "max_tokens": 1})
        assert assert_error(r, 503)["code"] == "draining"  # while the streams still run
        for t in threads:
            t.join(180)
        assert finished == {i: (TOKENS, ["length"]) for i in range(3)}, output()  # whole, none cut
        assert proc.wait(120) == 0, output()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
