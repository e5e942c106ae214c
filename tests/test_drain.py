"""429 when the queue is full, and SIGTERM on a real `loramux serve` (server/__main__.py DrainingServer): new
requests get 503 `draining` while the requests in flight finish, for up to
--drain-timeout, beyond uvicorn's own 5 s graceful shutdown; when the drain
timeout expires the process exits and cuts what is still in flight; a second
signal exits at once.

The request in flight is an upload whose body the test sends slowly, so it
lasts exactly as long as the test wants, whatever the machine's speed."""
from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time

import httpx
import pytest

from helpers.live_server import BASE, KEY, Server, assert_error, assert_serving, make_api_files, wait_for

GRACEFUL = 5  # uvicorn's timeout_graceful_shutdown in _serve
BOUNDARY = "drainXYZ"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_api_files(tmp_path_factory.mktemp("drain"))


class SlowUpload:
    """POST /v1/adapters of allowed/a1, sent by hand in chunks; the request is in
    flight (the server's Gate counts it) from its first chunk on."""

    def __init__(self, server: Server, folder, name: str = "slow"):
        self.parts = [f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\n{name}\r\n".encode()]
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            self.parts.append(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{f}\"; filename=\"{f}\"\r\n"
                              "Content-Type: application/octet-stream\r\n\r\n".encode() + (folder / f).read_bytes()
                              + b"\r\n")
        self.parts.append(f"--{BOUNDARY}--\r\n".encode())
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
        self.sock.sendall((f"POST /v1/adapters HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                           f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                           "Transfer-Encoding: chunked\r\n\r\n").encode())
        self.chunk(self.parts.pop(0))
        self.wait_read(server.port)

    def wait_read(self, server_port: int) -> None:
        """Until the server's end of the connection has read every byte sent
        (/proc/net/tcp: its receive queue is empty), and a moment for the
        request to reach the app, where it is counted in flight."""
        ours = self.sock.getsockname()[1]

        def unread() -> int | None:
            for line in open("/proc/net/tcp").read().splitlines()[1:]:
                f = line.split()
                if int(f[1].split(":")[1], 16) == server_port and int(f[2].split(":")[1], 16) == ours:
                    return int(f[4].split(":")[1], 16)
            return None

        assert wait_for(lambda: unread() == 0), unread()
        time.sleep(0.3)

    def chunk(self, data: bytes) -> None:
        self.sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    def finish(self) -> bytes:
        """The rest of the body, then the whole reply (b"" if the server closed without one)."""
        for part in self.parts:
            self.chunk(part)
        self.sock.sendall(b"0\r\n\r\n")
        reply = b""
        while data := self.sock.recv(65536):
            reply += data
        return reply

    def trickle_until_closed(self, limit_s: float) -> bytes:
        """Send one byte of padding every 0.2 s (the body never ends) until the
        server closes the connection; what it sent back."""
        self.sock.settimeout(0.2)
        deadline = time.monotonic() + limit_s
        reply = b""
        while time.monotonic() < deadline:
            try:
                self.chunk(b" ")
                data = self.sock.recv(65536)
                if not data:
                    return reply
                reply += data
            except socket.timeout:
                continue
            except OSError:  # reset or broken pipe: closed
                return reply
        raise AssertionError(f"the connection was still open after {limit_s} s")

    def close(self) -> None:
        self.sock.close()


def health(server: Server) -> int:
    """/health's status; 0 once nothing listens."""
    try:
        return httpx.get(server.url + "/health", timeout=5).status_code
    except httpx.ConnectError:
        return 0


def wait_exit(server: Server, timeout: float):
    try:
        return server.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


LONG = {"max_tokens": 480, "temperature": 0, "ignore_eos": True}


def idle(server: Server) -> bool:
    m = server.metrics()
    return m["loramux:num_requests_running"] == 0 and m["loramux:kv_cache_usage_perc"] == 0 \
        and m["loramux:num_requests_waiting"] == 0


def test_queue_full_is_429_then_sigterm_waits_past_uvicorns_graceful_timeout(files, tmp_path):
    s = Server(files / "base", tmp_path / "store", "--max-num-seqs", "1", "--max-waiting", "1",
               "--drain-timeout", "60")
    streams = []
    try:
        def open_stream(max_tokens):
            cm = s.http.stream("POST", "/v1/completions", json={
                "model": BASE, "prompt": "hi", "stream": True, **LONG, "max_tokens": max_tokens})
            r = cm.__enter__()
            streams.append(cm)
            return r

        lines = open_stream(480).iter_lines()
        next(lines)  # running (keep `lines`: a dropped generator closes the stream)
        threading.Thread(target=open_stream, args=(4,), daemon=True).start()
        assert wait_for(lambda: s.metrics()["loramux:num_requests_waiting"] == 1)
        err = assert_error(s.http.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 2}), 429)
        assert err["code"] == "queue_full"
        for cm in streams:
            cm.__exit__(None, None, None)
        streams.clear()
        assert wait_for(lambda: idle(s))
        assert_serving(s)

        # SIGTERM with an upload in flight: 503 for new requests; the upload outlasts
        # uvicorn's graceful timeout and still completes; then the process exits
        upload = SlowUpload(s, files / "allowed" / "a1")
        try:
            s.proc.send_signal(signal.SIGTERM)
            assert wait_for(lambda: health(s) == 503)
            err = assert_error(s.http.post("/v1/completions", json={"model": BASE, "prompt": "x"}), 503)
            assert err["code"] == "draining"
            time.sleep(GRACEFUL + 1.5)  # uvicorn alone would have cancelled the upload by now
            assert s.proc.poll() is None and health(s) == 503
            reply = upload.finish()
        finally:
            upload.close()
        assert reply.split(b" ", 2)[1] == b"201", reply[:300]
        assert wait_exit(s, 30) == 0
        assert (tmp_path / "store" / "slow" / "adapter_model.safetensors").read_bytes() == \
            (files / "allowed" / "a1" / "adapter_model.safetensors").read_bytes()
    finally:
        for cm in streams:
            cm.__exit__(None, None, None)
        s.stop()


def test_drain_timeout_expiring_exits_and_cuts_the_request(files, tmp_path):
    s = Server(files / "base", tmp_path / "store", "--drain-timeout", "1")
    upload = SlowUpload(s, files / "allowed" / "a1")
    try:
        s.proc.send_signal(signal.SIGTERM)
        # drain (1 s) and uvicorn's graceful shutdown (5 s) end; the body never does
        reply = upload.trickle_until_closed(GRACEFUL + 20)
        assert b" 201 " not in reply[:20], reply[:300]
        assert wait_exit(s, 20) == 0
        assert not (tmp_path / "store" / "slow").exists()
    finally:
        upload.close()
        s.stop()


def test_a_second_signal_exits_at_once(files, tmp_path):
    s = Server(files / "base", tmp_path / "store", "--drain-timeout", "300")
    upload = SlowUpload(s, files / "allowed" / "a1")
    try:
        s.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: health(s) == 503)
        assert wait_exit(s, 1) is None  # draining: waits for the upload
        s.proc.send_signal(signal.SIGINT)
        # well before the drain timeout (300 s) or the upload's end (never)
        assert wait_exit(s, 20) == 0
        upload.trickle_until_closed(10)  # and the upload is cut
    finally:
        upload.close()
        s.stop()
