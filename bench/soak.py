"""Soak test for a live loramux server: mixed, hostile and churning traffic
for a bounded time, then a check that nothing leaked.

C worker threads (one httpx.Client each) send, for `--seconds`/`--minutes`:

- valid traffic: /v1/completions and /v1/chat/completions, streamed or not,
  on the base model, on adapters uploaded from `--adapter-dir` (under fresh
  names) and on per-request mixes (`"adapters": [{"name", "weight"}, ...]`),
  greedy or sampled with a seed, 4..24 tokens;
- hostile requests, each with the status it must get (HOSTILE below): tiny
  temperature/top_p (200), NaN, 2**64 seeds, 1e300 weights, a 40 MB prompt,
  unknown models, adapter uploads with absurd configs, a NUL in a path;
- client disconnects: a stream closed after 1-3 events;
- adapter churn: upload, stream on it, DELETE it mid-stream (the stream must
  still end normally, new requests get 404); concat merges of two small
  adapters, used, then deleted.

Every hostile kind runs once first (spread over the workers), then each
iteration draws its action from a seeded random.Random. Every response is
recorded by (kind, status); a status outside the kind's expected set (or a
stream that ends badly) is "unexpected", a status >= 500 or a transport error
that was not a deliberate disconnect is a "5xx". At the end the soak waits
for the server to go idle and reads /metrics: KV cache usage and
`loramux:adapter_refs` must be 0; resident memory growth is reported.

Bounded: every loop checks the deadline, every HTTP call has a timeout, and
only a server on this machine (127.0.0.1 / localhost) is accepted.

    python -P -m loramux.bench.soak --url http://127.0.0.1:8000 --api-key KEY --model tiny \\
        --adapter-dir path/to/peft_adapters --seconds 60 --concurrency 4 --json soak.json

Exit status 0 iff the report is ok. `run_soak(...)` returns the same report in-process.
"""
from __future__ import annotations

import argparse
import json
import random
import select
import socket
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import httpx

from loramux.bench.load_test import WORDS, check_local

MAX_SECONDS = 6 * 3600
TIMEOUT = httpx.Timeout(30.0, connect=10.0)
HUGE_PROMPT_BYTES = 40 * 2**20
MAX_HUGE_PROMPTS = 2  # the 40 MB prompt costs the server something until it is hardened
MAX_EXAMPLES = 20
WEIGHTS = (0.5, -0.3, 1.0, 0.25, -1.0)  # mix/merge weights: a few values, so equal mixes are shared

# kind -> the statuses it must get
HOSTILE = {
    "temperature_1e-300": {200}, "top_p_1e-300": {200}, "min_tokens_bad_stop_id": {400},
    "seed_2**64": {400}, "mix_weight_1e300": {400}, "temperature_nan": {400}, "prompt_40mb": {413},
    "unknown_model": {404}, "upload_alpha_1e300": {422}, "upload_target_regex": {422},
    "upload_deep_config": {422, 400}, "load_path_nul": {400, 403}, "merge_weight_1e300": {400},
}
EXPECTED = {
    **HOSTILE,
    **{f"{route}{s}/{t}": {200} for route in ("completion", "chat") for s in ("", "_stream")
       for t in ("base", "adapter", "mix")},
    "disconnect": {200}, "upload": {201}, "delete": {200}, "after_delete": {404},
    "inflight_stream": {200}, "inflight_request": {200, 404},  # 404: it lost the race with the DELETE
    "merge": {201, 400}, "merged_request": {200}, "delete_merged": {200}, "probe": {200},
}


class Recorder:
    """(kind, status) counts and the first unexpected examples; thread-safe.
    Status 0: a transport error; -1: the soak itself failed on the response."""

    def __init__(self):
        self.lock = threading.Lock()
        self.statuses: dict[str, Counter] = defaultdict(Counter)
        self.unexpected: list[dict] = []
        self.num_unexpected = 0

    def add(self, kind: str, status: int, body: str = "", problem: str | None = None) -> None:
        with self.lock:
            self.statuses[kind][status] += 1
            if problem is None and status in EXPECTED.get(kind, ()):
                return
            self.num_unexpected += 1
            if len(self.unexpected) < MAX_EXAMPLES:
                self.unexpected.append({"kind": kind, "status": status, "body": (problem or body)[:200]})


def post_raw(url: str, path: str, headers: dict, body: bytes, timeout: float = 60.0) -> tuple[int, str]:
    """POST a large body over a plain socket, reading the answer as soon as the
    server sends it (httpx would fail writing a body the server refuses)."""
    u = httpx.URL(url)
    host, port = u.host, u.port or 80
    with socket.create_connection((host, port), timeout=timeout) as sock:
        head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}",
                "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        view, sent = memoryview(body), 0
        try:
            while sent < len(body) and not select.select([sock], [], [], 0)[0]:
                sent += sock.send(view[sent:sent + 2**20])
        except OSError:  # the server closed its side: read what it answered
            pass
        data = b""
        try:
            while len(data) < 2**20 and (chunk := sock.recv(65536)):
                data += chunk
        except OSError:
            pass
    if not data.startswith(b"HTTP/"):
        raise httpx.RemoteProtocolError(f"no HTTP answer ({len(data)} bytes, {sent} of {len(body)} sent)")
    return int(data.split(b" ", 2)[1]), data.partition(b"\r\n\r\n")[2].decode("utf-8", "replace")


def read_metrics(url: str) -> dict[str, float]:
    """Every sample name of /metrics -> the sum of its values over labels; {} if unreadable."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(url + "/metrics", timeout=10).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[s.name] = out.get(s.name, 0.0) + s.value
        return out
    except (httpx.HTTPError, ValueError):
        return {}


def wait_idle(url: str, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = read_metrics(url)
        busy = m.get("loramux:num_requests_running", 0) + m.get("loramux:num_requests_waiting", 0)
        if (m and not busy) or time.monotonic() > deadline:
            return m
        time.sleep(0.25)


class Soak:
    def __init__(self, url, api_key, model, adapter_dir, seconds, concurrency, seed):
        self.url, self.model, self.concurrency, self.seed = url, model, concurrency, seed
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.seconds = seconds
        self.rec = Recorder()
        self.run_id = uuid.uuid4().hex[:8]
        self.names = iter(range(10**9))
        self.lock = threading.Lock()
        self.folders = sorted(p for p in Path(adapter_dir).iterdir()
                              if (p / "adapter_config.json").is_file() and (p / "adapter_model.safetensors").is_file())
        if not self.folders:
            raise ValueError(f"no PEFT adapter folders in {adapter_dir}")
        self.files = {p: ((p / "adapter_config.json").read_bytes(), (p / "adapter_model.safetensors").read_bytes())
                      for p in self.folders}
        self.plain = [p for p in self.folders if not json.loads(self.files[p][0]).get("use_dora")]
        self.stable: list[str] = []  # uploaded for the whole run, never deleted by workers
        self.mixable: list[tuple[int, str]] = []  # (rank, name) of the stable non-DoRA adapters
        self.hostile_todo = list(HOSTILE)
        random.Random(seed).shuffle(self.hostile_todo)
        self.huge_prompts = 0
        self.huge_body: bytes | None = None

    def fresh(self, prefix: str) -> str:
        with self.lock:
            return f"soak{self.run_id}-{prefix}{next(self.names)}"

    # -- HTTP helpers -------------------------------------------------------

    def send(self, http: httpx.Client, kind: str, method: str, path: str, check=None, **kw):
        """One request, recorded; check(response json) -> a problem or None for 2xx answers."""
        try:
            r = http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            self.rec.add(kind, 0, repr(exc))
            return None
        problem = None
        if check is not None and r.is_success:
            try:
                problem = check(r.json())
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                problem = f"bad body ({exc!r}): {r.text[:150]}"
        self.rec.add(kind, r.status_code, r.text, problem)
        return r

    def stream(self, http: httpx.Client, kind: str, path: str, body: dict, stop_after: int | None = None,
               after_first=None) -> None:
        """A streaming request read event by event; stop_after=N closes it after N
        events (a deliberate disconnect); after_first() runs once the first arrives."""
        try:
            with http.stream("POST", path, json={**body, "stream": True}) as r:
                if r.status_code != 200:
                    r.read()
                    self.rec.add(kind, r.status_code, r.text)
                    return
                events, done, problem, finish = 0, False, None, None
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    obj = json.loads(line[6:])
                    if "error" in obj:
                        problem = problem or f"error event: {line[6:150]}"
                    for choice in obj.get("choices") or ():
                        finish = choice.get("finish_reason") or finish
                    events += 1
                    if after_first is not None:
                        after_first()
                        after_first = None
                    if stop_after is not None and events >= stop_after:
                        break
                if stop_after is None and not problem:
                    if not done:
                        problem = f"stream ended without [DONE] after {events} events"
                    elif finish not in ("stop", "length"):
                        problem = f"stream ended with finish_reason {finish!r}"
                self.rec.add(kind, 200, problem=problem)
        except httpx.HTTPError as exc:
            self.rec.add(kind, 0, repr(exc))
        except ValueError as exc:  # an event that is not JSON
            self.rec.add(kind, -1, problem=f"bad event: {exc!r}")

    def upload(self, http, kind: str, name: str, config: bytes, weights: bytes):
        return self.send(http, kind, "POST", "/v1/adapters", data={"name": name}, files={
            "adapter_config.json": ("adapter_config.json", config),
            "adapter_model.safetensors": ("adapter_model.safetensors", weights)})

    # -- traffic ------------------------------------------------------------

    def body(self, rng: random.Random, chat: bool, **extra) -> dict:
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 24)))
        body = {"model": self.model, "max_tokens": rng.randint(4, 24), "temperature": rng.choice((0.0, 0.8))}
        if body["temperature"]:
            body["seed"] = rng.randrange(2**31)
        body.update({"messages": [{"role": "user", "content": words}]} if chat else {"prompt": words})
        return {**body, **extra}

    def valid(self, http, rng: random.Random) -> None:
        chat, streamed = rng.random() < 0.5, rng.random() < 0.5
        target = rng.choice(("base", "adapter", "mix") if len(self.mixable) >= 1 else ("base", "adapter"))
        body = self.body(rng, chat)
        if target == "adapter":
            body["model"] = rng.choice(self.stable)
        elif target == "mix":
            pair = rng.sample(self.mixable, 2) if len(self.mixable) >= 2 else self.mixable * 2
            body["adapters"] = [{"name": n, "weight": rng.choice(WEIGHTS)} for _, n in pair]
        kind = f"{'chat' if chat else 'completion'}{'_stream' if streamed else ''}/{target}"
        path = "/v1/chat/completions" if chat else "/v1/completions"
        if streamed:
            self.stream(http, kind, path, body)
        else:
            self.send(http, kind, "POST", path, json=body, check=check_choices)

    def hostile(self, http, rng: random.Random, kind: str) -> None:
        base = self.body(rng, chat=False)
        target = self.mixable[0][1] if self.mixable else self.stable[0]
        config, weights = self.files[(self.plain or self.folders)[0]]
        completion = lambda **kw: self.send(http, kind, "POST", "/v1/completions", json={**base, **kw},  # noqa: E731
                                            check=check_choices)
        if kind == "temperature_1e-300":
            completion(temperature=1e-300)
        elif kind == "top_p_1e-300":
            completion(top_p=1e-300, temperature=0.8, seed=1)
        elif kind == "min_tokens_bad_stop_id":
            completion(min_tokens=1, stop_token_ids=[100000000])
        elif kind == "seed_2**64":
            completion(seed=2**64, temperature=0.8)
        elif kind == "mix_weight_1e300":
            completion(adapters=[{"name": target, "weight": 1e300}])
        elif kind == "unknown_model":
            completion(model=f"no-such-model-{self.run_id}")
        elif kind == "temperature_nan":
            raw = json.dumps({k: v for k, v in base.items() if k != "temperature"})[:-1] + ', "temperature": NaN}'
            self.send(http, kind, "POST", "/v1/completions", content=raw.encode(),
                      headers={"Content-Type": "application/json"})
        elif kind == "prompt_40mb":
            with self.lock:
                self.huge_prompts += 1
                if self.huge_body is None:
                    head = json.dumps({"model": self.model, "max_tokens": 4, "prompt": ""})[:-2].encode()
                    self.huge_body = head + b"the " * (HUGE_PROMPT_BYTES // 4) + b'"}'
            try:
                status, text = post_raw(self.url, "/v1/completions", {**self.headers,
                                        "Content-Type": "application/json"}, self.huge_body, timeout=TIMEOUT.read)
                self.rec.add(kind, status, text)
            except (OSError, httpx.HTTPError) as exc:
                self.rec.add(kind, 0, repr(exc))
        elif kind.startswith("upload_"):
            cfg = json.loads(config)
            if kind == "upload_alpha_1e300":
                cfg["lora_alpha"] = 1e300
            elif kind == "upload_target_regex":
                cfg["target_modules"] = "model\\.layers\\.[0-9]\\.(.*)*z"
            data = json.dumps(cfg).encode()
            if kind == "upload_deep_config":
                data = b'{"peft_type": "LORA", "r": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
            name = self.fresh("bad")
            r = self.upload(http, kind, name, data, weights)
            if r is not None and r.status_code == 201:  # accepted by mistake: do not leave it behind
                self.send(http, "delete", "DELETE", f"/v1/adapters/{name}")
        elif kind == "load_path_nul":
            self.send(http, kind, "POST", "/v1/load_lora_adapter",
                      json={"lora_name": self.fresh("nul"), "lora_path": "/tmp/soak\x00adapter"})
        elif kind == "merge_weight_1e300":
            name = self.fresh("badmerge")
            r = self.send(http, kind, "POST", "/v1/adapters/merge",
                          json={"name": name, "sources": [{"adapter": target, "weight": 1e300}]})
            if r is not None and r.status_code == 201:
                self.send(http, "delete_merged", "DELETE", f"/v1/adapters/{name}")
        else:
            raise ValueError(kind)

    def disconnect(self, http, rng: random.Random) -> None:
        body = self.body(rng, chat=False, max_tokens=64, ignore_eos=True)
        if rng.random() < 0.5:
            body["model"] = rng.choice(self.stable)
        self.stream(http, "disconnect", "/v1/completions", body, stop_after=rng.randint(1, 3))

    def churn(self, http, rng: random.Random) -> None:
        """Upload, stream on it, DELETE it mid-stream: the stream still ends
        normally, a request that raced the DELETE gets 200 or 404, later ones 404."""
        name = self.fresh("churn")
        r = self.upload(http, "upload", name, *self.files[rng.choice(self.folders)])
        if r is None or r.status_code != 201:
            return
        racer = threading.Thread(target=self.send, args=(http, "inflight_request", "POST", "/v1/completions"),
                                 kwargs={"json": self.body(rng, chat=False, model=name), "check": check_choices})

        deleted = []

        def delete_now():
            deleted.append(name)
            racer.start()
            self.send(http, "delete", "DELETE", f"/v1/adapters/{name}")
            self.send(http, "after_delete", "POST", "/v1/completions", json=self.body(rng, chat=False, model=name))

        body = self.body(rng, chat=False, model=name, max_tokens=24, ignore_eos=True)
        self.stream(http, "inflight_stream", "/v1/completions", body, after_first=delete_now)
        if not deleted:  # the stream failed or gave no event
            delete_now()
        racer.join(TIMEOUT.read + 10)

    def merge(self, http, rng: random.Random) -> None:
        if not self.mixable:
            return
        smallest = sorted(self.mixable)[:2]
        pair = smallest if len(smallest) == 2 else smallest * 2
        name = self.fresh("merged")
        r = self.send(http, "merge", "POST", "/v1/adapters/merge", json={
            "name": name, "method": "concat",
            "sources": [{"adapter": n, "weight": rng.choice(WEIGHTS)} for _, n in pair]})
        if r is None or r.status_code != 201:
            return
        self.send(http, "merged_request", "POST", "/v1/completions", json=self.body(rng, chat=False, model=name),
                  check=check_choices)
        self.send(http, "delete_merged", "DELETE", f"/v1/adapters/{name}")

    def worker(self, index: int, deadline: float) -> None:
        rng = random.Random(self.seed * 1000 + index + 1)
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=TIMEOUT) as http:
            while time.monotonic() < deadline:
                with self.lock:
                    todo = self.hostile_todo.pop() if self.hostile_todo else None
                try:
                    if todo is not None:
                        self.hostile(http, rng, todo)
                    else:
                        self.step(http, rng)
                except Exception as exc:  # a bug in the soak: recorded, the worker goes on
                    self.rec.add("soak", -1, problem=f"soak error: {exc!r}")

    def step(self, http, rng: random.Random) -> None:
        x = rng.random()
        if x < 0.60:
            self.valid(http, rng)
        elif x < 0.75:
            kind = rng.choice(list(HOSTILE))
            if kind == "prompt_40mb" and self.huge_prompts >= MAX_HUGE_PROMPTS:
                kind = "unknown_model"
            self.hostile(http, rng, kind)
        elif x < 0.85:
            self.disconnect(http, rng)
        elif x < 0.93:
            self.churn(http, rng)
        else:
            self.merge(http, rng)

    # -- the run ------------------------------------------------------------

    def run(self) -> dict:
        start = time.monotonic()
        deadline = start + self.seconds
        rng = random.Random(self.seed)
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=TIMEOUT) as http:
            for folder in self.folders:  # the stable adapters, and a warm-up on each
                name = self.fresh("stable")
                r = self.upload(http, "upload", name, *self.files[folder])
                if r is not None and r.status_code == 201:
                    self.stable.append(name)
                    if folder in self.plain:  # DoRA adapters cannot be mixed or merged (422)
                        self.mixable.append((int(r.json()["rank"]), name))
                    self.send(http, "completion/adapter", "POST", "/v1/completions",
                              json=self.body(rng, chat=False, model=name), check=check_choices)
            if not self.stable:
                raise RuntimeError(f"no adapter could be uploaded: {self.rec.unexpected[:3]}")
            self.send(http, "chat/base", "POST", "/v1/chat/completions", json=self.body(rng, chat=True),
                      check=check_choices)
            rss_start = read_metrics(self.url).get("process_resident_memory_bytes")
            threads = [threading.Thread(target=self.worker, args=(i, deadline), daemon=True)
                       for i in range(self.concurrency)]
            for t in threads:
                t.start()
            stop_by = deadline + 3 * TIMEOUT.read  # the last iterations' requests may run past the deadline
            for t in threads:
                t.join(max(0.0, stop_by - time.monotonic()))
            hung = sum(t.is_alive() for t in threads)
            for name in self.stable:
                self.send(http, "delete", "DELETE", f"/v1/adapters/{name}")
            wait_idle(self.url)
            self.send(http, "probe", "POST", "/v1/completions", check=check_choices,
                      json={"model": self.model, "prompt": "ok", "max_tokens": 2, "temperature": 0})
            end = wait_idle(self.url)
        return self.report(time.monotonic() - start, rss_start, end, hung)

    def report(self, duration: float, rss_start, end: dict, hung: int) -> dict:
        statuses = {k: dict(sorted(c.items())) for k, c in sorted(self.rec.statuses.items())}
        errors = Counter()
        for c in statuses.values():
            for status, n in c.items():
                if not 200 <= status < 300:
                    errors[status] += n
        num_5xx = sum(n for s, n in errors.items() if s >= 500 or s == 0)
        rss_end = end.get("process_resident_memory_bytes")
        kv_end = end.get("loramux:kv_cache_usage_perc")
        refs_end = end.get("loramux:adapter_refs")
        unexpected = list(self.rec.unexpected)
        if hung:
            unexpected.append({"kind": "soak", "status": -1, "body": f"{hung} worker(s) did not stop"})
        num_unexpected = self.rec.num_unexpected + (hung > 0)
        label = lambda s: "transport" if s == 0 else "soak_error" if s == -1 else str(s)  # noqa: E731
        return {
            "duration_s": round(duration, 2),
            "requests": {k: sum(c.values()) for k, c in statuses.items()},
            "statuses": {k: {label(s): n for s, n in c.items()} for k, c in statuses.items()},
            "expected": {k: sorted(EXPECTED.get(k, ())) for k in statuses},
            "served": sum(n for c in statuses.values() for s, n in c.items() if 200 <= s < 300),
            "errors_by_status": {label(s): n for s, n in sorted(errors.items())},
            "num_5xx": num_5xx,
            "num_unexpected": num_unexpected,
            "unexpected": unexpected[:MAX_EXAMPLES],
            "rss_start_bytes": rss_start, "rss_end_bytes": rss_end,
            "rss_growth_bytes": None if rss_start is None or rss_end is None else rss_end - rss_start,
            "kv_usage_end": kv_end, "adapter_refs_end": refs_end,
            "ok": num_5xx == 0 and num_unexpected == 0 and kv_end == 0 and refs_end in (0, None),
        }


def check_choices(body: dict) -> str | None:
    choices = body["choices"]
    if not choices or any(c.get("finish_reason") not in ("stop", "length") for c in choices):
        return f"bad choices: {json.dumps(choices)[:150]}"
    return None


def run_soak(url: str, api_key: str, model: str, adapter_dir, seconds: float, concurrency: int = 4,
             seed: int = 0) -> dict:
    """Run the soak against the server at url; returns the report (see the module docstring)."""
    if not 0 < seconds <= MAX_SECONDS or not 1 <= concurrency <= 64:
        raise ValueError("seconds must be in (0, 6 h] and concurrency in 1..64")
    return Soak(check_local(url), api_key, model, adapter_dir, seconds, concurrency, seed).run()


def format_report(report: dict) -> str:
    lines = [f"{'kind':<28} {'n':>6}  {'statuses':<32} expected"]
    for kind, n in report["requests"].items():
        got = " ".join(f"{s}:{c}" for s, c in report["statuses"][kind].items())
        want = ",".join(map(str, report["expected"][kind]))
        bad = any(s not in map(str, report["expected"][kind]) for s in report["statuses"][kind])
        lines.append(f"{kind:<28} {n:>6}  {got:<32} {want}{'  <-- UNEXPECTED' if bad else ''}")
    mb = lambda v: "n/a" if v is None else f"{v / 2**20:.1f} MiB"  # noqa: E731
    lines += [
        f"duration {report['duration_s']} s, served (2xx) {report['served']}, 5xx {report['num_5xx']}, "
        f"unexpected {report['num_unexpected']}, errors by status {report['errors_by_status']}",
        f"RSS start {mb(report['rss_start_bytes'])}, end {mb(report['rss_end_bytes'])}, "
        f"growth {mb(report['rss_growth_bytes'])}; KV usage at the end {report['kv_usage_end']}, "
        f"adapter refs at the end {report['adapter_refs_end']}",
    ]
    for ex in report["unexpected"]:
        lines.append(f"  unexpected {ex['kind']} -> {ex['status']}: {ex['body']}")
    lines.append("OK" if report["ok"] else "FAILED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--api-key", default="")
    p.add_argument("--model", required=True, help="the served base model name")
    p.add_argument("--adapter-dir", required=True, type=Path, help="PEFT adapter folders for the base model")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--minutes", type=float)
    g.add_argument("--seconds", type=float)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the report here")
    args = p.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else 60 * (args.minutes if args.minutes is not None else 1)
    try:
        report = run_soak(args.url, args.api_key, args.model, args.adapter_dir, seconds, args.concurrency, args.seed)
    except (ValueError, OSError) as exc:  # a non-local URL, a missing adapter folder
        raise SystemExit(str(exc)) from None
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
