"""Routing by adapter: the Gateway API inference extension's model server
protocol (server/metrics.py's `vllm:` names) on a real `loramux serve`, /metrics
open past the API key, a full queue and a drain (server/api/gate.py), and the
manifests in deploy/k8s checked against the CLI and the metrics served.

The live test gives the device pool room for two rank-4 adapters, two running
sequences and two adapters per batch: requests for lora-a and lora-b run (their
adapters pinned), those for lora-c and lora-d wait and cannot even be
prefetched, so each list of vllm:lora_requests_info has one right answer."""
from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from helpers.live_server import AUTH, BASE, ROOT, Server, assert_error, upload_dir, wait_for
from helpers.tiny import make_adapter, make_chat_model

K8S = ROOT / "deploy" / "k8s"
NAMES = ("lora-a", "lora-b", "lora-c", "lora-d")
RANK = 4
KV_BYTES = 8 * 2**20  # helpers/live_server.py's --kv-cache-bytes
CONTEXT = 8192  # the tiny model's context, raised so a request outlives every check
LONG = {"max_tokens": CONTEXT - 64, "temperature": 0, "ignore_eos": True, "stream": True}
ROUTER_FAMILIES = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                   "vllm:lora_requests_info", "vllm:cache_config_info")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("router")
    make_chat_model(root / "base")
    config = json.loads((root / "base" / "config.json").read_text())
    config["max_position_embeddings"] = CONTEXT
    (root / "base" / "config.json").write_text(json.dumps(config))
    for seed, name in enumerate(NAMES, 1):
        make_adapter(root / "base", root / "adapters" / name, r=RANK, alpha=8, seed=seed)
    return root


def model_config(files: Path):
    from transformers import AutoConfig

    from loramux.server.config import ModelConfig

    return ModelConfig.from_hf(AutoConfig.from_pretrained(files / "base"))


class Stream(threading.Thread):
    """One streaming completion, read in its own thread until `close()`: the
    reader then leaves the stream, which aborts the request in the server."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.started = threading.Event()  # the first token arrived
        self._closing = threading.Event()
        self.start()

    def run(self):
        try:
            with httpx.Client(base_url=self.url, headers=AUTH, timeout=120) as client, \
                    client.stream("POST", "/v1/completions", json=self.body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.started.set()
                    if self._closing.is_set():
                        return
        except httpx.HTTPError:
            pass



def close_all(streams: list[Stream]) -> None:
    """Leave every stream (a waiting request's reader returns once it starts, after the others go)."""
    for r in streams:
        r._closing.set()
    for r in streams:
        r.join(60)
        assert not r.is_alive()


def scrape(url: str) -> dict:
    """/metrics without any credentials: family name -> [(labels, value)]."""
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.status_code == 200, r.text
    return {f.name: [(s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(r.text)}


def until(server: Server, predicate, what: str) -> None:
    """Poll /metrics until predicate(families); on a timeout, fail with the last scrape and the server's log."""
    last = {}

    def check():
        nonlocal last
        last = scrape(server.url)
        return predicate(last)

    if not wait_for(check, 60):
        shown = {k: v for k, v in last.items() if k.startswith("vllm:") or "adapter_requests" in k}
        pytest.fail(f"not {what}: {shown}\n{server.output()}")


def value(families: dict, name: str, **labels) -> float:
    [v] = [v for lab, v in families[name] if all(lab.get(k) == x for k, x in labels.items())]
    return v


def lora_info(url: str) -> dict:
    """The one vllm:lora_requests_info series (its labels, as lists), checked as the picker reads it."""
    before = time.time()
    families = scrape(url)
    after = time.time()
    series = families["vllm:lora_requests_info"]
    assert len(series) == 1, series  # stale label sets are gone
    labels, stamp = series[0]
    assert set(labels) == {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}
    assert before - 1 <= stamp <= after + 1  # a unix timestamp of this scrape, in seconds
    assert families["loramux:lora_requests_info"] == [(labels, stamp)]  # one reading, both names
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert families["vllm:" + name] == families["loramux:" + name], name
    split = {k: labels[k].split(",") if labels[k] else [] for k in ("running_lora_adapters", "waiting_lora_adapters")}
    return {"max_lora": labels["max_lora"], "running": split["running_lora_adapters"],
            "waiting": split["waiting_lora_adapters"], "families": families}


@pytest.mark.slow
def test_router_metrics_follow_the_engine_and_the_device_pool(files, tmp_path):
    import torch

    from loramux.adapters_store.device_pool import page_bytes
    from loramux.server.config import EngineConfig
    from loramux.server.model.kv_tensors import KVCache

    cfg = model_config(files)
    pool = (2 * RANK + 1) * page_bytes(cfg, torch.float32, cpu_path=True)  # two rank-4 adapters, not three
    s = Server(files / "base", tmp_path / "store", "--max-num-seqs", "2", "--max-loras-per-batch", "2",
               "--max-lora-rank", str(RANK), "--adapter-pool-bytes", str(pool), "--max-waiting", "2")
    streams: list[Stream] = []

    def stream(**body) -> Stream:
        streams.append(Stream(s.url, {"model": BASE, "prompt": "hi", **LONG, **body}))
        return streams[-1]

    try:
        for name in NAMES:
            assert upload_dir(s.http, name, files / "adapters" / name).status_code == 201

        # idle, nothing resident yet: the series exists before any request
        info = lora_info(s.url)
        assert (info["max_lora"], info["running"], info["waiting"]) == ("2", [], [])
        block_size = EngineConfig().block_size
        num_blocks = KVCache.blocks_for_budget(cfg, KV_BYTES, block_size, torch.float32)
        [(cache, one)] = info["families"]["vllm:cache_config_info"]
        assert one == 1.0
        assert (cache["block_size"], cache["num_gpu_blocks"]) == (str(block_size), str(num_blocks))
        assert cache["cache_dtype"] == "float32" and cache["engine"] == "0"

        # lora-a and lora-b run; lora-c and lora-d wait (no room on the device beside the pinned two)
        running = [stream(model=name) for name in NAMES[:2]]
        assert all(r.started.wait(60) for r in running)
        waiting = [stream(model=name) for name in NAMES[2:]]
        until(s, lambda m: value(m, "vllm:num_requests_waiting") == 2, "two waiting")
        info = lora_info(s.url)
        m = info["families"]
        assert value(m, "vllm:num_requests_running") == 2 and value(m, "vllm:num_requests_waiting") == 2
        for name in NAMES:  # the engine's own per-request counts, through the other code path
            assert value(m, "loramux:adapter_requests_running", adapter=name) == (name in NAMES[:2])
            assert value(m, "loramux:adapter_requests_waiting", adapter=name) == (name in NAMES[2:])
        assert (info["running"], info["waiting"]) == (["lora-a", "lora-b"], ["lora-c", "lora-d"])
        used = value(m, "vllm:kv_cache_usage_perc") * num_blocks  # the fraction of num_gpu_blocks in use
        assert used >= 2 and abs(used - round(used)) < 1e-6

        # the queue is full: a new request is refused, /metrics still answers, without the API key
        assert_error(s.http.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 2}), 429)
        assert httpx.get(s.url + "/v1/models", timeout=10).status_code == 401
        assert set(ROUTER_FAMILIES) <= set(scrape(s.url))

        # lora-a and lora-b go: lora-c and lora-d run in their pages
        close_all(running)
        assert all(r.started.wait(60) for r in waiting)
        until(s, lambda m: value(m, "vllm:num_requests_running") == 2 and value(m, "vllm:num_requests_waiting") == 0
              and m["vllm:lora_requests_info"][0][0]["running_lora_adapters"] == "lora-c,lora-d", "c and d running")
        info = lora_info(s.url)
        assert info["waiting"] == [] and value(info["families"], "vllm:num_requests_running") == 2

        # idle: the resident adapters are still listed as running (a request for them starts without a load)
        close_all(waiting)
        until(s, lambda m: value(m, "vllm:num_requests_running") == 0, "idle")
        info = lora_info(s.url)
        assert (info["running"], info["waiting"]) == (["lora-c", "lora-d"], [])

        # a request waiting (for a sequence slot) on a resident adapter: that adapter is not "waiting"
        same = [stream(model="lora-c") for _ in range(2)]
        assert all(r.started.wait(60) for r in same)
        same.append(stream(model="lora-c"))  # alone: adds in flight count against --max-waiting
        until(s, lambda m: value(m, "vllm:num_requests_waiting") == 1, "one waiting")
        info = lora_info(s.url)
        assert value(info["families"], "loramux:adapter_requests_waiting", adapter="lora-c") == 1
        assert (info["running"], info["waiting"]) == (["lora-c", "lora-d"], [])
        close_all(same)
        until(s, lambda m: value(m, "vllm:num_requests_running") == 0, "idle")

        # a per-request mix takes one of the two slots; it has no name, so it is never listed
        mix = stream(adapters=[{"name": "lora-a", "weight": 0.5}])
        assert mix.started.wait(60)
        info = lora_info(s.url)
        m = info["families"]
        assert value(m, "loramux:adapter_requests_running", adapter="mix") == 1
        assert value(m, "loramux:adapter_pool_resident_adapters", tier="device") == 2
        assert len(info["running"]) == 1 and set(info["running"]) <= {"lora-c", "lora-d"}, info["running"]
        close_all([mix])

        # deleted adapters leave the list at once
        for name in ("lora-c", "lora-d"):
            assert s.http.delete(f"/v1/adapters/{name}").status_code == 200
        assert lora_info(s.url)["running"] == []
    finally:
        close_all(streams)
        s.stop()


@pytest.mark.slow
def test_metrics_stays_open_while_draining(files, tmp_path):
    s = Server(files / "base", tmp_path / "store", "--drain-timeout", "60")
    stream = Stream(s.url, {"model": BASE, "prompt": "hi", **LONG})
    try:
        assert stream.started.wait(60)
        s.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: httpx.get(s.url + "/health", timeout=5).status_code == 503)
        err = assert_error(s.http.post("/v1/completions", json={"model": BASE, "prompt": "x"}), 503)
        assert err["code"] == "draining"
        m = scrape(s.url)  # the picker still reads the draining pod (no key, no 503)
        assert value(m, "vllm:num_requests_running") == 1 and value(m, "vllm:num_requests_waiting") == 0
        close_all([stream])  # the drain ends with the last request
        assert s.proc.wait(30) == 0
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not exit after its last request: {s.output()}")
    finally:
        close_all([stream])
        s.stop()


# ---------------------------------------------------------------------------
# deploy/k8s
# ---------------------------------------------------------------------------

def manifests() -> dict[tuple[str, str], dict]:
    """Every object in deploy/k8s/*.yaml by (kind, name)."""
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                key = (doc["kind"], doc["metadata"]["name"])
                assert key not in out, key
                out[key] = doc
    return out


def flags(args: list[str]) -> dict[str, str]:
    """--flag value pairs of a container's args."""
    assert len(args) % 2 == 0 and all(a.startswith("--") for a in args[::2]), args
    return dict(zip(args[::2], args[1::2]))


def served_families(files: Path) -> dict:
    """What a loramux server's /metrics holds (its app state over the tiny model, no HTTP)."""
    from loramux.adapters_store.store import AdapterStore
    from loramux.server.api.state import ServerSettings, ServerState
    from loramux.server.config import EngineConfig
    from loramux.server.engine.engine import Engine
    from loramux.server.llm import load_base

    net, tokenizer, folder = load_base(str(files / "base"), "float32", "cpu")
    state = ServerState.assemble(Engine(net, tokenizer, EngineConfig(kv_cache_bytes=KV_BYTES)),
                                 AdapterStore(files / "k8s-store"), ServerSettings(BASE, str(folder)))
    try:
        text = state.metrics.render().decode()
    finally:
        state.close()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_k8s_manifests_agree_with_the_cli_and_the_metrics(files):
    from loramux.server.__main__ import build_parser

    objs = manifests()
    deploy, service = objs[("Deployment", "loramux")], objs[("Service", "loramux")]
    pod = deploy["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    [container] = pod["spec"]["containers"]
    assert container["command"] == ["loramux", "serve"]
    args = build_parser().parse_args(["serve", *container["args"]])  # SystemExit on a flag serve lacks
    assert args.func.__name__ == "_serve"
    [port] = container["ports"]
    assert port["containerPort"] == args.port and args.host == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": port["name"]}, probe
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"] for v in pod["spec"]["volumes"]}
    assert mounts[args.data_dir] in volumes
    assert all(Path(root).as_posix() in mounts for root in args.allowed_adapter_root)
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop + args.drain_timeout + 5  # + uvicorn's 5 s
    assert {e["name"] for e in container["env"]} >= {"LORAMUX_API_KEY"} and args.api_key is None
    selector = deploy["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items() and service["spec"]["selector"].items() <= pod_labels.items()

    # the InferencePool selects those pods on that port, its picker is the EPP Service
    pool = objs[("InferencePool", "loramux")]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [port["containerPort"]]
    ref = pool["spec"]["endpointPickerRef"]
    epp_service = objs[("Service", ref["name"])]
    assert ref["port"]["number"] in [p["port"] for p in epp_service["spec"]["ports"]]
    route = objs[("HTTPRoute", "loramux")]
    assert route["spec"]["rules"][0]["backendRefs"][0] == {
        "group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "loramux"}

    # the EPP: its pool, its config's scorers, and metric names that loramux serves with the labels it reads
    epp = objs[("Deployment", "loramux-epp")]
    epp_pod = epp["spec"]["template"]
    assert epp_service["spec"]["selector"].items() <= epp_pod["metadata"]["labels"].items()
    [picker] = epp_pod["spec"]["containers"]
    epp_flags = flags(picker["args"])
    assert epp_flags["--pool-name"] == pool["metadata"]["name"]
    mount = {m["name"]: m["mountPath"] for m in picker["volumeMounts"]}["plugins-config"]
    config_map = objs[("ConfigMap", next(v["configMap"]["name"] for v in epp_pod["spec"]["volumes"]
                                         if v["name"] == "plugins-config"))]
    config_file = Path(epp_flags["--config-file"])
    assert config_file.parent.as_posix() == mount
    config = yaml.safe_load(config_map["data"][config_file.name])
    assert config["kind"] == "EndpointPickerConfig"
    types = {p.get("name", p["type"]): p["type"] for p in config["plugins"]}
    assert {"queue-scorer", "kv-cache-utilization-scorer", "lora-affinity-scorer"} <= set(types.values())
    [profile] = config["schedulingProfiles"]
    assert {p["pluginRef"] for p in profile["plugins"]} == set(types)
    assert epp_flags["--model-server-metrics-path"] == "/metrics"

    served = served_families(files)
    reads = {"--total-queued-requests-metric": set(), "--total-running-requests-metric": set(),
             "--kv-cache-usage-percentage-metric": set(),
             "--lora-info-metric": {"max_lora", "running_lora_adapters", "waiting_lora_adapters"},
             "--cache-info-metric": {"block_size", "num_gpu_blocks"}}
    for flag, labels in reads.items():
        name = epp_flags[flag]
        assert name in served, (flag, name)
        family = served[name]
        assert family.type == "gauge" and len(family.samples) == 1, (name, family.samples)
        assert labels <= set(family.samples[0].labels), (name, family.samples[0].labels)
    [cache] = served["vllm:cache_config_info"].samples
    assert int(cache.labels["block_size"]) > 0 and int(cache.labels["num_gpu_blocks"]) > 0
