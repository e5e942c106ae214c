"""The Ray Serve application: an ingress over N loramux replicas.

Two ways to run it, one set of options (those of `loramux serve`, plus the
scale-out ones of `loramux ray-serve`):

    loramux ray-serve --num-replicas 2 --model M --adapter-dir /shared/adapters --port 8000
    serve run loramux.server.ray_serve.app:build_app model=M adapter_dir=/shared/adapters num_replicas=2

`build_app` takes Ray's builder arguments (strings, from `serve run` or a
`serve deploy` config's `args:`) and reads them with the same parser as the
command line, so every option means the same in both places. The adapter
folder must be one that every replica reads (a shared volume on a cluster).
"""
from __future__ import annotations

import argparse
import logging
import signal
import threading
import time

from ray import serve
from ray.serve import Application

from loramux.server.ray_serve.ingress import LoramuxIngress
from loramux.server.assembly import served_name
from loramux.server.ray_serve.metrics_board import MetricsBoard
from loramux.server.ray_serve.replica import LoramuxReplica, replica_capacity

log = logging.getLogger("loramux.ray_serve")

APP_NAME = "loramux"


def deployment_options(args: argparse.Namespace) -> dict:
    """The replica deployment's Ray options: replicas or autoscaling, concurrency, CPUs and threads."""
    ongoing, _ = replica_capacity(args)
    options: dict = {
        "max_ongoing_requests": ongoing,
        # what Ray gives in-flight requests when it stops a replica (scale-down, redeploy, shutdown)
        "graceful_shutdown_timeout_s": args.drain_timeout,
        "ray_actor_options": {"num_cpus": args.replica_cpus,
                              # one torch thread per core the replica is given, not one per core of the node
                              "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(max(1, int(args.replica_cpus)))}}},
    }
    if args.min_replicas is not None or args.max_replicas is not None:
        autoscaling = {"min_replicas": args.min_replicas if args.min_replicas is not None else 1,
                       "max_replicas": args.max_replicas if args.max_replicas is not None else args.num_replicas}
        if args.target_ongoing_requests is not None:
            autoscaling["target_ongoing_requests"] = args.target_ongoing_requests
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = args.num_replicas
    return options


def application(args: argparse.Namespace) -> Application:
    """The bound application for parsed `ray-serve` options."""
    ongoing, max_adapters = replica_capacity(args)
    board = MetricsBoard.bind()
    replicas = LoramuxReplica.options(**deployment_options(args)).bind(args, max_adapters, board)
    # the ingress only relays bytes: it may hold every replica's requests at once
    ingress = LoramuxIngress.options(max_ongoing_requests=ongoing * max(args.num_replicas, args.max_replicas or 0),
                                     graceful_shutdown_timeout_s=args.drain_timeout,
                                     ray_actor_options={"num_cpus": 0})
    return ingress.bind(replicas, board, served_name(args), max(args.max_upload_bytes, args.max_file_bytes, args.max_request_bytes))


def parse_builder_args(builder_args: dict) -> argparse.Namespace:
    """Ray's builder arguments ({"num_replicas": "2", "adapter_dir": "..."}) as parsed `ray-serve`
    options; a flag option takes "true"/"false"."""
    from loramux.server.__main__ import build_parser

    argv = ["ray-serve"]
    for key, value in builder_args.items():
        flag = "--" + key.replace("_", "-")
        values = value if isinstance(value, list) else [value]  # repeatable options (allowed_adapter_root)
        for v in values:
            argv += [flag, str(v)]
    return build_parser().parse_args(argv)


def build_app(builder_args: dict) -> Application:
    """Ray Serve's application builder (`serve run loramux.server.ray_serve.app:build_app key=value ...`)."""
    return application(parse_builder_args(builder_args))


def drain(ingress, timeout_s: float) -> None:
    """New requests refused (503) from now on; wait until those in flight finished, at most timeout_s."""
    ingress.drain.remote().result()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and ingress.requests_in_flight.remote().result() > 0:
        time.sleep(0.2)


def run(args: argparse.Namespace) -> int:
    """`loramux ray-serve`: start or join a Ray cluster, deploy, serve on --host/--port
    until SIGTERM/SIGINT, then drain as `loramux serve` does (new requests 503, those in
    flight finish, up to --drain-timeout) and delete the application."""
    import ray

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ray.init(address=args.ray_address, include_dashboard=False)
    # Handlers go in before the deploy: the proxy serves as soon as the ingress is up, which is
    # before serve.run returns, and a SIGTERM in that window must drain, not kill the process.
    # (After ray.init, whose own handler would otherwise replace them.)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": args.host, "port": args.port})
    ingress = serve.run(application(args), name=APP_NAME, route_prefix="/")
    log.info("loramux on Ray Serve: http://%s:%d (%s replicas)", args.host, args.port, args.num_replicas)
    stop.wait()
    log.info("draining (up to %.0f s)", args.drain_timeout)
    drain(ingress, args.drain_timeout)
    serve.delete(APP_NAME)
    if args.ray_address is None:  # the cluster is ours: stop Serve with it; a shared one keeps its other apps
        serve.shutdown()
    ray.shutdown()
    return 0
