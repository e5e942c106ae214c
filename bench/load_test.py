"""Load test for any OpenAI-compatible server: loramux, vLLM, LoRAX, ...

An async client streams completions (or chat completions) and times every
request as the user sees it: time to first token (TTFT), the gaps between
streamed chunks (inter-token latency, ITL), time per output token after the
first (TPOT) and end-to-end latency. Every request names an adapter as its
`model`, so one server serves them all in mixed batches. The workload follows
S-LoRA and Punica:

- adapters: N names (`--num-adapters`, `lora-0` ...), or `--adapter-names`;
  with 0 adapters every request goes to the base model;
- popularity: uniform, zipf (`--zipf-alpha`), skewed (80 % of the requests to
  the hottest 20 % of the adapters), identical (all to one adapter), distinct
  (request i to adapter i mod N);
- arrivals: Poisson or gamma (`--cv`) at `--rate` requests/s (several rates =
  several runs: a latency-vs-load curve), or closed loop with `--concurrency`
  C clients (several values likewise);
- lengths: prompt and output tokens fixed (`64`) or drawn: `uniform:LO:HI`,
  `normal:MEAN:STD`, `exp:MEAN`, `choice:A,B,...`. Prompts are words that are
  one token each in SmolLM2's tokenizer (about one token each elsewhere), so
  a prompt of N words is N tokens on the default model;
- every request is greedy with `max_tokens` and `ignore_eos`, so every
  server generates the same number of tokens.

Runs are bounded: at most `--num-requests` requests and `--duration` seconds of
sending, then `--drain-timeout` seconds for the requests in flight. Only a
server on this machine (127.0.0.1 / localhost) is accepted.

    python -P -m loramux.bench.load_test --url http://127.0.0.1:8000 --num-adapters 8 \\
        --popularity zipf --rate 2 4 8 --num-requests 200 --duration 120 \\
        --upload path/to/peft_adapter --out bench/results/loramux.json --plot curve.png
    python -P -m loramux.bench.load_test --compare bench/results/vllm.json bench/results/loramux.json
    python -P -m loramux.bench.load_test --plot curve.png --plot-from a.json b.json

(`loramux bench ...` is the same command.)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from loramux.bench.popularity import POPULARITIES, choose

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_REQUESTS = 100_000
MAX_DURATION_S = 3600.0

# One token each (with and without a leading space) in SmolLM2's tokenizer.
WORDS = (
    "the of and to in is was for on that with as by at from his her it an are were which this be or has "
    "had not but their they one first also its new after who two all been more when other there into time "
    "over only can most some would where years many out during than so later people up about she him made "
    "between three these them such both world city through used under school then while part until state "
    "well may any each day same year life name work back long great end high small found known house water "
    "music family game team book song film story line place group system war side power number best early "
    "local light open road river party south north west east"
).split()


# ---------------------------------------------------------------------------
# workload
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Length:
    """A token count: fixed, or drawn from a distribution (always >= 1)."""

    kind: str  # fixed | uniform | normal | exp | choice
    params: tuple[float, ...]

    @classmethod
    def parse(cls, text: str) -> Length:
        """'64', 'uniform:32:128', 'normal:64:16', 'exp:64', 'choice:16,32,64'."""
        kind, _, rest = text.partition(":")
        try:
            if not rest:
                return cls("fixed", (int(kind),))
            if kind == "choice":
                return cls(kind, tuple(int(v) for v in rest.split(",")))
            params = tuple(float(v) for v in rest.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad length {text!r}") from None
        arity = {"uniform": 2, "normal": 2, "exp": 1}
        if kind not in arity or len(params) != arity[kind]:
            raise argparse.ArgumentTypeError(f"bad length {text!r}: use N, uniform:LO:HI, normal:MEAN:STD, "
                                             "exp:MEAN or choice:A,B,...")
        return cls(kind, params)

    def sample(self, rng: random.Random) -> int:
        p = self.params
        if self.kind == "fixed":
            value = p[0]
        elif self.kind == "uniform":
            value = rng.randint(int(p[0]), int(p[1]))
        elif self.kind == "normal":
            value = round(rng.gauss(p[0], p[1]))
        elif self.kind == "exp":
            value = round(rng.expovariate(1.0 / p[0]))
        else:
            value = rng.choice(p)
        return max(1, int(value))

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(int(self.params[0]))
        sep = "," if self.kind == "choice" else ":"
        return self.kind + ":" + sep.join(f"{v:g}" for v in self.params)


@dataclass(frozen=True)
class RequestSpec:
    index: int
    adapter: str | None  # None: the base model
    prompt: str
    max_tokens: int


@dataclass(frozen=True)
class Workload:
    """What is asked, independent of when: the same seed gives the same
    requests to every system (load_test.py over HTTP, baselines.py offline)."""

    num_requests: int
    adapters: tuple[str, ...] = ()
    popularity: str = "uniform"
    zipf_alpha: float = 1.0
    prompt_len: Length = Length("fixed", (64,))
    output_len: Length = Length("fixed", (32,))
    seed: int = 0

    def requests(self) -> list[RequestSpec]:
        rng = random.Random(self.seed)
        n = len(self.adapters)
        if n == 0:
            picks = [None] * self.num_requests
        else:
            picks = choose(self.popularity, n, self.num_requests, rng, self.zipf_alpha)
        specs = []
        for i, pick in enumerate(picks):
            words = [rng.choice(WORDS) for _ in range(self.prompt_len.sample(rng))]
            specs.append(RequestSpec(i, None if pick is None else self.adapters[pick], " ".join(words),
                                     self.output_len.sample(rng)))
        return specs


@dataclass(frozen=True)
class Arrivals:
    """Open loop (poisson, gamma) at `rate` requests/s, or closed loop with
    `concurrency` clients that each send the next request when one finishes."""

    kind: str = "poisson"  # poisson | gamma | closed
    rate: float = 1.0
    cv: float = 1.0  # gamma: coefficient of variation of the gaps (1 = Poisson)
    concurrency: int = 1

    def offsets(self, count: int, seed: int) -> list[float]:
        """Send times (seconds after the start) of `count` open-loop requests."""
        rng = random.Random(seed + 1)
        shape = 1.0 if self.kind == "poisson" else 1.0 / (self.cv * self.cv)
        t, out = 0.0, []
        for _ in range(count):
            out.append(t)
            t += rng.gammavariate(shape, 1.0 / (self.rate * shape))
        return out

    def describe(self) -> str:
        if self.kind == "closed":
            return f"closed loop, {self.concurrency} clients"
        return f"{self.kind} {self.rate:g} req/s" + (f" cv {self.cv:g}" if self.kind == "gamma" else "")


# ---------------------------------------------------------------------------
# one request
# ---------------------------------------------------------------------------

@dataclass
class Result:
    index: int
    adapter: str | None
    status: str = "pending"  # "200", an HTTP status, stream_error, timeout, connect_error, cancelled
    error: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    start: float = 0.0  # seconds after the run's start
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "200"

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.ttft is None:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Target:
    url: str
    base_model: str
    endpoint: str = "completions"  # completions | chat
    api_key: str | None = None
    ignore_eos: bool = True
    request_timeout: float = 300.0

    def body(self, spec: RequestSpec) -> dict:
        body = {"model": spec.adapter or self.base_model, "max_tokens": spec.max_tokens, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}}
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": spec.prompt}]
        else:
            body["prompt"] = spec.prompt
        return body

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"


def _error_message(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode("utf-8", "replace")


async def send(client: httpx.AsyncClient, target: Target, spec: RequestSpec, t0: float) -> Result:
    """One streamed request; never raises (failures are in Result.status)."""
    res = Result(spec.index, spec.adapter)
    start = time.perf_counter()
    res.start = start - t0
    chunks, last, usage = 0, None, None
    try:
        async with client.stream("POST", target.path, json=target.body(spec)) as resp:
            if resp.status_code != 200:
                res.status, res.error = str(resp.status_code), _error_message(await resp.aread())
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    res.status, res.error = "stream_error", str(event["error"].get("message", ""))[:200]
                    return res
                usage = event.get("usage") or usage
                for choice in event.get("choices") or ():
                    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    if text:
                        now = time.perf_counter()
                        if last is None:
                            res.ttft = now - start
                        else:
                            res.itl.append(now - last)
                        last = now
                        chunks += 1
                    res.finish_reason = choice.get("finish_reason") or res.finish_reason
        res.e2e = time.perf_counter() - start
        res.output_tokens = usage["completion_tokens"] if usage else chunks
        res.prompt_tokens = usage["prompt_tokens"] if usage else 0
        if res.ttft is None:  # no text at all (every token was whitespace-free nothing): time the end
            res.ttft = res.e2e
        res.status = "200"
    except httpx.TimeoutException:
        res.status, res.error = "timeout", f"no answer within {target.request_timeout:g} s"
    except httpx.TransportError as exc:
        res.status, res.error = "connect_error", f"{type(exc).__name__}: {exc}"[:200]
    except (ValueError, KeyError, TypeError) as exc:  # a malformed stream
        res.status, res.error = "stream_error", f"{type(exc).__name__}: {exc}"[:200]
    except asyncio.CancelledError:
        res.status, res.error = "cancelled", "still running at the end of --drain-timeout"
    return res


# ---------------------------------------------------------------------------
# a run
# ---------------------------------------------------------------------------

class Progress:
    """tqdm when it is installed, else one rewritten stderr line."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled = total, label, enabled
        self.done = self.failed = 0
        self._bar, self._last = None, 0.0
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, desc=label, unit="req", file=sys.stderr, leave=False)

    def update(self, res: Result) -> None:
        self.done += 1
        self.failed += not res.ok
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(failed=self.failed, refresh=False)
        elif time.monotonic() - self._last > 0.5 or self.done == self.total:
            self._last = time.monotonic()
            print(f"\r{self.label}: {self.done}/{self.total} done, {self.failed} failed", end="",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print(file=sys.stderr)


async def run_load(target: Target, specs: list[RequestSpec], arrivals: Arrivals, *, duration: float,
                   drain_timeout: float, seed: int = 0, progress: bool = True) -> tuple[list[Result], float]:
    """Send `specs` as `arrivals` says; stop sending after `duration` s, wait
    `drain_timeout` s more for the requests in flight, cancel the rest.
    Returns the results of the requests sent and the run's wall time."""
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    width = arrivals.concurrency if arrivals.kind == "closed" else 1000
    limits = httpx.Limits(max_connections=width, max_keepalive_connections=width)
    timeout = httpx.Timeout(target.request_timeout, connect=10.0)
    bar = Progress(len(specs), arrivals.describe(), progress)
    results: list[Result] = []
    async with httpx.AsyncClient(base_url=target.url, headers=headers, limits=limits, timeout=timeout) as client:
        t0 = time.perf_counter()
        stop_sending = t0 + duration

        async def one(spec: RequestSpec) -> None:
            res = await send(client, target, spec, t0)
            results.append(res)
            bar.update(res)

        tasks: list[asyncio.Task] = []
        if arrivals.kind == "closed":
            queue = iter(specs)

            async def client_loop() -> None:
                for spec in queue:
                    if time.perf_counter() >= stop_sending:
                        return
                    await one(spec)

            tasks = [asyncio.create_task(client_loop()) for _ in range(arrivals.concurrency)]
        else:
            for spec, offset in zip(specs, arrivals.offsets(len(specs), seed)):
                if offset >= duration:
                    break
                delay = t0 + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(spec)))
        if tasks:
            deadline = max(stop_sending, time.perf_counter()) + drain_timeout
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - t0
    bar.close()
    return sorted(results, key=lambda r: r.index), wall


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _dist(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values) if values else None,
            **{f"p{q}": percentile(values, q) for q in (50, 90, 99)}}


def summarize(results: list[Result], wall: float, slo_ttft: float | None) -> dict:
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.status] = errors.get(r.status, 0) + 1
        else:
            reasons[r.finish_reason or "none"] = reasons.get(r.finish_reason or "none", 0) + 1
    # Throughput over the time the work took: first send to last finish.
    span = max((r.start + r.e2e for r in ok), default=0.0) - min((r.start for r in ok), default=0.0)
    span = span if span > 0 else wall
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    summary = {
        "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "errors": dict(sorted(errors.items())), "finish_reasons": dict(sorted(reasons.items())),
        "duration_s": span, "wall_s": wall,
        "prompt_tokens": prompt_tokens, "output_tokens": out_tokens,
        "request_throughput": len(ok) / span if span else 0.0,
        "output_throughput": out_tokens / span if span else 0.0,
        "total_token_throughput": (out_tokens + prompt_tokens) / span if span else 0.0,
        "ttft_s": _dist([r.ttft for r in ok]),
        "itl_s": _dist([x for r in ok for x in r.itl]),
        "tpot_s": _dist([r.tpot for r in ok if r.tpot is not None]),
        "e2e_s": _dist([r.e2e for r in ok]),
    }
    if slo_ttft is not None:  # failed requests miss the SLO
        met = sum(1 for r in ok if r.ttft <= slo_ttft)
        summary["slo_ttft_s"] = slo_ttft
        summary["slo_attainment"] = met / len(results) if results else 0.0
    return summary


# ---------------------------------------------------------------------------
# tables, comparison, plot
# ---------------------------------------------------------------------------

# (label, key path, format, scale)
ROWS = [
    ("requests completed", ("completed",), "{:.0f}", 1),
    ("requests failed", ("failed",), "{:.0f}", 1),
    ("output tokens", ("output_tokens",), "{:.0f}", 1),
    ("duration s", ("duration_s",), "{:.2f}", 1),
    ("request throughput req/s", ("request_throughput",), "{:.3f}", 1),
    ("output throughput tok/s", ("output_throughput",), "{:.1f}", 1),
    ("total throughput tok/s", ("total_token_throughput",), "{:.1f}", 1),
    *[(f"{name} {q} ms", (key, q), "{:.1f}", 1e3)
      for name, key in (("TTFT", "ttft_s"), ("ITL", "itl_s"), ("TPOT", "tpot_s"), ("e2e", "e2e_s"))
      for q in ("mean", "p50", "p90", "p99")],
    ("SLO attainment (TTFT)", ("slo_attainment",), "{:.1%}", 1),
]


def _get(summary: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(summary, dict) or key not in summary:
            return None
        summary = summary[key]
    return summary


def _fmt(value, fmt: str, scale: float) -> str:
    return "-" if value is None else fmt.format(value * scale)


def format_table(run: dict) -> str:
    s = run["summary"]
    lines = [f"== {run['load']}: {s['completed']}/{s['requests']} ok"]
    for label, path, fmt, scale in ROWS:
        if path == ("slo_attainment",) and "slo_attainment" in s:
            label = f"SLO attainment (TTFT <= {s['slo_ttft_s'] * 1e3:g} ms)"
        lines.append(f"  {label:34} {_fmt(_get(s, path), fmt, scale):>12}")
    if s["errors"]:
        lines.append("  errors by status: " + ", ".join(f"{k}: {v}" for k, v in s["errors"].items()))
    return "\n".join(lines)


def format_compare(a: dict, b: dict) -> str:
    """Two reports side by side: run i of a against run i of b, ratio b / a."""
    la, lb = a.get("label") or "a", b.get("label") or "b"
    lines = []
    for ra, rb in zip(a["runs"], b["runs"]):
        lines.append(f"== {ra['load']} | {rb['load']}")
        lines.append(f"  {'metric':34} {la[:14]:>14} {lb[:14]:>14} {f'{lb[:8]}/{la[:8]}':>18}")
        for label, path, fmt, scale in ROWS:
            va, vb = _get(ra["summary"], path), _get(rb["summary"], path)
            ratio = f"{vb / va:.2f}x" if va and vb is not None else "-"
            lines.append(f"  {label:34} {_fmt(va, fmt, scale):>14} {_fmt(vb, fmt, scale):>14} {ratio:>18}")
        errs = {k: (ra["summary"]["errors"].get(k, 0), rb["summary"]["errors"].get(k, 0))
                for k in ra["summary"]["errors"].keys() | rb["summary"]["errors"].keys()}
        for k, (ea, eb) in sorted(errs.items()):
            lines.append(f"  {'errors ' + k:34} {ea:>14} {eb:>14}")
    if len(a["runs"]) != len(b["runs"]):
        lines.append(f"(compared the first {min(len(a['runs']), len(b['runs']))} runs: "
                     f"{len(a['runs'])} vs {len(b['runs'])})")
    return "\n".join(lines)


def plot(reports: list[dict], path: str) -> None:
    """Latency vs load: TTFT and e2e p50/p99 against achieved request throughput."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'loramux[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for rep in reports:
        runs = sorted(rep["runs"], key=lambda r: r["summary"]["request_throughput"])
        x = [r["summary"]["request_throughput"] for r in runs]
        for ax, key, title in zip(axes, ("ttft_s", "tpot_s", "e2e_s"), ("TTFT", "TPOT", "end-to-end latency")):
            for q, style in (("p50", "-o"), ("p99", "--^")):
                y = [(_get(r["summary"], (key, q)) or math.nan) * 1e3 for r in runs]
                ax.plot(x, y, style, label=f"{rep.get('label') or 'run'} {q}")
            ax.set_title(title)
            ax.set_xlabel("achieved throughput (req/s)")
            ax.set_ylabel("ms")
            ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    w = reports[0].get("workload", {})
    fig.suptitle(f"latency vs load: {w.get('adapters', '?')} adapters, {w.get('popularity', '?')}, "
                 f"prompt {w.get('prompt_len', '?')}, output {w.get('output_len', '?')} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------
# setup: local target, base model name, adapter upload
# ---------------------------------------------------------------------------

def check_local(url: str) -> str:
    """The base URL, only if it names this machine."""
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or parsed.host not in LOCAL_HOSTS:
        raise SystemExit(f"refusing to load-test {url!r}: only http://127.0.0.1 or localhost are allowed")
    return str(parsed).rstrip("/")


def base_model_name(client: httpx.Client) -> str:
    """The served base model: the first /v1/models card that is not an adapter."""
    cards = client.get("/v1/models").raise_for_status().json()["data"]
    for card in cards:
        if not card.get("parent"):
            return card["id"]
    raise SystemExit("the server lists no base model in /v1/models")


def upload_adapters(client: httpx.Client, names: list[str], folders: list[Path]) -> None:
    """POST /v1/adapters (multipart) for each name, cycling through the PEFT
    folders; a name the server already has (409) is kept as it is."""
    for i, name in enumerate(names):
        folder = folders[i % len(folders)]
        files = {f: (f, (folder / f).read_bytes()) for f in ("adapter_config.json", "adapter_model.safetensors")}
        r = client.post("/v1/adapters", data={"name": name}, files=files)
        if r.status_code not in (200, 201, 409):
            raise SystemExit(f"uploading {folder} as {name!r} failed: {r.status_code} {_error_message(r.content)}")


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loramux bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (this machine only)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="base model name (default: from /v1/models)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    w = p.add_argument_group("workload")
    w.add_argument("--num-adapters", type=int, default=8, help="adapters named PREFIX-0 ... (0: base model only)")
    w.add_argument("--adapter-prefix", default="lora")
    w.add_argument("--adapter-names", default=None, help="comma-separated names instead of PREFIX-i")
    w.add_argument("--popularity", choices=POPULARITIES, default="uniform")
    w.add_argument("--zipf-alpha", type=float, default=1.0)
    w.add_argument("--prompt-len", type=Length.parse, default=Length.parse("64"),
                   help="tokens: N, uniform:LO:HI, normal:MEAN:STD, exp:MEAN, choice:A,B")
    w.add_argument("--output-len", type=Length.parse, default=Length.parse("32"), help="max_tokens, likewise")
    w.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let EOS end a request early (default: ignore_eos, every system makes the same tokens)")
    w.add_argument("--seed", type=int, default=0)
    a = p.add_argument_group("arrivals and bounds")
    a.add_argument("--arrivals", choices=["poisson", "gamma", "closed"], default="poisson")
    a.add_argument("--rate", type=float, nargs="+", default=[1.0], help="requests/s; several = one run each")
    a.add_argument("--cv", type=float, default=1.0, help="gamma arrivals: coefficient of variation")
    a.add_argument("--concurrency", type=int, nargs="+", default=[4], help="closed loop clients; several = runs")
    a.add_argument("--num-requests", type=int, default=100, help=f"per run (at most {MAX_REQUESTS})")
    a.add_argument("--duration", type=float, default=60.0, help=f"seconds of sending per run (<= {MAX_DURATION_S:g})")
    a.add_argument("--drain-timeout", type=float, default=60.0, help="seconds for requests in flight after that")
    a.add_argument("--request-timeout", type=float, default=300.0)
    a.add_argument("--warmup", type=int, default=0, help="requests sent (closed loop) and dropped before each run")
    o = p.add_argument_group("setup and output")
    o.add_argument("--upload", type=Path, action="append", default=[], metavar="PEFT_DIR",
                   help="POST /v1/adapters each adapter name from these folders (cycled) before the runs")
    o.add_argument("--slo-ttft", type=float, default=1.0, help="TTFT target in seconds for SLO attainment")
    o.add_argument("--label", default=None, help="name of this system in --compare and --plot")
    o.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    o.add_argument("--plot", default=None, metavar="PNG", help="latency vs load of the runs (or of --plot-from)")
    o.add_argument("--plot-from", nargs="+", type=Path, default=None, metavar="JSON",
                   help="plot these reports instead of running")
    o.add_argument("--compare", nargs=2, type=Path, default=None, metavar=("A_JSON", "B_JSON"),
                   help="print two reports side by side (ratio B/A) and exit")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _validate(args) -> None:
    if not 0 < args.num_requests <= MAX_REQUESTS:
        raise SystemExit(f"--num-requests must be in 1..{MAX_REQUESTS}")
    if not 0 < args.duration <= MAX_DURATION_S:
        raise SystemExit(f"--duration must be in (0, {MAX_DURATION_S:g}]")
    if not 0 <= args.drain_timeout <= MAX_DURATION_S or not 0 < args.request_timeout <= MAX_DURATION_S:
        raise SystemExit("--drain-timeout and --request-timeout must be within an hour")
    if any(r <= 0 for r in args.rate) or any(c <= 0 for c in args.concurrency) or args.cv <= 0:
        raise SystemExit("--rate, --concurrency and --cv must be positive")
    if not 0 <= args.warmup <= 1000:
        raise SystemExit("--warmup must be in 0..1000")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        print(format_compare(a, b))
        return 0
    if args.plot_from:
        if not args.plot:
            raise SystemExit("--plot-from needs --plot PNG")
        plot([json.loads(p.read_text()) for p in args.plot_from], args.plot)
        print(f"wrote {args.plot}")
        return 0
    _validate(args)
    url = check_local(args.url)
    names = (args.adapter_names.split(",") if args.adapter_names
             else [f"{args.adapter_prefix}-{i}" for i in range(args.num_adapters)])
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        if args.upload:
            upload_adapters(client, names, args.upload)
        base = args.model or base_model_name(client)
    workload = Workload(args.num_requests, tuple(names), args.popularity, args.zipf_alpha, args.prompt_len,
                        args.output_len, args.seed)
    target = Target(url, base, args.endpoint, args.api_key, args.ignore_eos, args.request_timeout)
    loads = ([Arrivals("closed", concurrency=c) for c in args.concurrency] if args.arrivals == "closed"
             else [Arrivals(args.arrivals, rate=r, cv=args.cv) for r in args.rate])
    report = {
        "label": args.label, "url": url, "base_model": base, "endpoint": args.endpoint,
        "workload": {"adapters": len(names), "popularity": args.popularity, "zipf_alpha": args.zipf_alpha,
                     "prompt_len": str(args.prompt_len), "output_len": str(args.output_len),
                     "ignore_eos": args.ignore_eos, "num_requests": args.num_requests, "seed": args.seed},
        "bounds": {"duration_s": args.duration, "drain_timeout_s": args.drain_timeout,
                   "request_timeout_s": args.request_timeout},
        "runs": [],
    }
    specs = workload.requests()
    for load in loads:
        if args.warmup:
            warm = Workload(args.warmup, tuple(names), args.popularity, args.zipf_alpha, args.prompt_len,
                            args.output_len, args.seed + 7919).requests()
            asyncio.run(run_load(target, warm, Arrivals("closed", concurrency=min(args.warmup, 8)),
                                 duration=args.duration, drain_timeout=args.drain_timeout, progress=False))
        results, wall = asyncio.run(run_load(target, specs, load, duration=args.duration,
                                             drain_timeout=args.drain_timeout, seed=args.seed,
                                             progress=not args.quiet))
        run = {"load": load.describe(), "arrivals": asdict(load),
               "summary": summarize(results, wall, args.slo_ttft),
               "requests": [{k: v for k, v in asdict(r).items() if k != "itl"} for r in results]}
        report["runs"].append(run)
        print(format_table(run), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    if args.plot:
        plot([report], args.plot)
        print(f"wrote {args.plot}")
    return 0 if all(r["summary"]["completed"] for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
