"""A real `loramux serve` process on 127.0.0.1 for tests, with the official
openai client and httpx, and the assertions every HTTP test shares."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]  # the repository
KEY = "test-key"
BASE = "tiny"
AUTH = {"Authorization": f"Bearer {KEY}"}
UPLOAD_CAP = 256 * 1024


# ---------------------------------------------------------------------------
# a server process
# ---------------------------------------------------------------------------

def wait_for(predicate, timeout: float = 20.0) -> bool:
    """Whether predicate() became true within `timeout` seconds (polled every 50 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, adapter_dir: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(adapter_dir.parent / f"server-{self.port}.log", "w+")
        args = [sys.executable, "-m", "loramux.server", "serve", "--model", str(model), "--dtype", "float32",
                "--adapter-dir", str(adapter_dir), "--data-dir", str(adapter_dir.parent / "data"), "--port", str(self.port), "--api-key", KEY,
                "--served-model-name", BASE, "--kv-cache-bytes", "8M", "--adapter-pool-bytes", "4M",
                "--log-level", "warning", *extra]
        env = dict(os.environ)  # loramux is imported as installed (or through PYTHONPATH)
        env.pop("LORAMUX_API_KEY", None)
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start: {self.output()}")
            time.sleep(0.2)
        self.http = httpx.Client(base_url=self.url, headers=AUTH, timeout=60)
        self.openai = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=60)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def metrics(self) -> dict[str, float]:
        """Every sample as 'name{label="v",...}' -> value."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out


def assert_error(r: httpx.Response, status: int, param: str | None = "__any__") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert "Traceback" not in err["message"] and " at 0x" not in err["message"]
    if param != "__any__":
        assert err["param"] == param, err
    return err


def assert_serving(server: Server) -> None:
    r = server.openai.completions.create(model=BASE, prompt="ok", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


def upload(http: httpx.Client, name: str, config: bytes, weights: bytes, **kw) -> httpx.Response:
    return http.post("/v1/adapters", data={"name": name},
                     files={"adapter_config.json": ("adapter_config.json", config),
                            "adapter_model.safetensors": ("adapter_model.safetensors", weights)}, **kw)


def upload_dir(http: httpx.Client, name: str, folder: Path) -> httpx.Response:
    return upload(http, name, (folder / "adapter_config.json").read_bytes(),
                  (folder / "adapter_model.safetensors").read_bytes())


def serve_with_adapters(model: Path, adapter_dir: Path, adapters: dict[str, Path], *extra: str) -> Server:
    """A started server with each adapter folder uploaded under its name."""
    s = Server(model, adapter_dir, *extra)
    for name, folder in adapters.items():
        r = upload_dir(s.http, name, folder)
        assert r.status_code == 201, r.text
    return s


def make_api_files(root: Path) -> Path:
    """What the HTTP tests serve: a tiny chat model (root/base) and two PEFT
    adapters under root/allowed: a1 (r=8, all seven modules) and a2 (r=4, q,v)."""
    from helpers.tiny import make_adapter, make_chat_model

    make_chat_model(root / "base")
    make_adapter(root / "base", root / "allowed" / "a1", r=8, alpha=16, seed=1)
    make_adapter(root / "base", root / "allowed" / "a2", r=4, alpha=8, seed=2, target_modules=("q_proj", "v_proj"))
    return root


def post_endless_multipart(port: int, path: str, boundary: str, head: bytes, chunks, timeout: float = 30) -> tuple[int, dict]:
    """POST a chunked multipart body (no Content-Length) of head then chunks, never ending it: a
    server can only answer if it counts the bytes as they arrive. (status, JSON body) of the reply."""
    import json

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                      "Transfer-Encoding: chunked\r\n\r\n").encode())
        for chunk in [head, *chunks]:
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < int(
                reply.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]):
            more = sock.recv(65536)
            assert more, reply
            reply += more
    head_text, payload = reply.split(b"\r\n\r\n", 1)
    return int(head_text.split()[1]), json.loads(payload)
