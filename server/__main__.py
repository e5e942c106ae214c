"""Command line: `loramux serve ...`, `loramux generate ...`, `loramux export-merged ...`, `loramux finetune ...`,
`loramux bench ...`
(and `python -m loramux.server ...`)."""
from __future__ import annotations

import argparse
import sys

from loramux.adapters_store.file_store import DEFAULT_MAX_BYTES as DEFAULT_MAX_FILE_BYTES
from loramux.server.engine.grammar_compiler import DEFAULT_TIMEOUT_S
from loramux.server.finetune.cli import add_parser as add_finetune_parser


def _generate(args) -> int:
    from loramux.server.llm import LLM
    from loramux.adapters_store.peft_format import AdapterError
    from loramux.server.engine.sampling import SamplingParams

    adapters = {}
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep:
            print(f"--adapter takes NAME=PATH, got {spec!r}", file=sys.stderr)
            return 2
        adapters[name] = path
    try:
        llm = LLM(model=args.model, dtype=args.dtype, adapters=adapters)
    except (AdapterError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                              top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    names = [args.use] if args.use else ([None] + list(adapters) if adapters else [None])
    for name in names:
        if args.chat:
            out = llm.chat([[{"role": "user", "content": args.prompt}]], sampling, [name])[0]
        else:
            out = llm.generate([args.prompt], sampling, [name])[0]
        print(f"[{name or 'base'}] {out.text}")
    return 0


def _export_merged(args) -> int:
    from loramux.server.model.export import export_merged
    from loramux.adapters_store.peft_format import AdapterError

    try:
        out = export_merged(args.model, args.adapter, args.out)
    except (AdapterError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def _bytes(text: str) -> int:
    """'512M', '2G', '1048576' -> bytes."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _serve(args) -> int:
    import asyncio
    import logging
    import time

    import uvicorn

    from loramux.server.api.app import create_app
    from loramux.server.assembly import api_key, assemble_state

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("loramux.serve")
    try:
        api_key(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        state = assemble_state(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    folder = state.settings.model_root
    served = state.settings.served_model_name
    app = create_app(state)

    class DrainingServer(uvicorn.Server):
        """SIGTERM/SIGINT: stop taking requests (503), let those in flight finish
        (up to --drain-timeout), then exit. A second signal exits at once."""

        deadline = None

        def handle_exit(self, sig, frame):
            if self.deadline is not None:
                self.force_exit = self.should_exit = True
                return
            self.deadline = time.monotonic() + args.drain_timeout
            state.draining = True

        async def on_tick(self, counter):
            if self.deadline is not None and (state.inflight == 0 or time.monotonic() > self.deadline):
                self.should_exit = True
            return await super().on_tick(counter)

    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=5))
    log.info("serving %s as %r on http://%s:%d", folder, served, args.host, args.port)
    log.info("kernels: %s", state.engine.engine.runner.kernel_paths())
    try:
        asyncio.run(server.serve())
    finally:
        state.close()
    return 0


def _ray_serve(args) -> int:
    from loramux.server.ray_serve.app import run

    return run(args)


def _bench(argv: list[str]) -> int:
    """bench/load_test.py (the bench package is installed with server/)."""
    from loramux.bench import load_test

    return load_test.main(argv)


def build_parser() -> argparse.ArgumentParser:
    """The `loramux` command line (tests check deploy/k8s's container args against it)."""
    parser = argparse.ArgumentParser(prog="loramux", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    srv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    srv.add_argument("--model", default="default", help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    srv.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    srv.add_argument("--device", default="cpu")
    srv.add_argument("--data-dir", default="data", help="runtime data (uploaded adapters under adapters/, "
                     "uploaded files under files/, fine-tuning jobs under fine_tuning/)")
    srv.add_argument("--adapter-dir", default=None, help="where uploaded adapters live (default: DATA_DIR/adapters)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None, help="required as `Authorization: Bearer KEY` on every route "
                     "but /health and /metrics (default: env LORAMUX_API_KEY; neither = no authentication; "
                     "an empty key is an error)")
    srv.add_argument("--served-model-name", default=None,
                     help="the base model's name in the API (default: SmolLM2-135M-Instruct or the folder name)")
    srv.add_argument("--max-loras-per-batch", type=int, default=None)
    srv.add_argument("--max-lora-rank", type=int, default=None)
    srv.add_argument("--kv-cache-bytes", "--kv-cache-memory", type=_bytes, default=None, metavar="BYTES",
                     help="KV cache budget, e.g. 512M")
    srv.add_argument("--adapter-pool-bytes", type=_bytes, default=None, metavar="BYTES",
                     help="device adapter pool budget, e.g. 1G")
    srv.add_argument("--adapter-host-bytes", type=_bytes, default=None, metavar="BYTES",
                     help="host cache of adapter weights read from disk, e.g. 4G (pinned on CUDA; "
                          "default: 0 on a CPU, whose device pool is host memory already, else 4G)")
    srv.add_argument("--max-num-seqs", type=int, default=None)
    srv.add_argument("--max-num-batched-tokens", type=int, default=None)
    srv.add_argument("--max-waiting", type=int, default=None, help="waiting requests before 429")
    srv.add_argument("--allowed-adapter-root", action="append", default=[], metavar="DIR",
                     help="folders /v1/load_lora_adapter may load from (repeatable; none = disabled)")
    srv.add_argument("--max-upload-bytes", type=_bytes, default=512 * 2**20, metavar="BYTES",
                     help="largest adapter upload (413 above it)")
    srv.add_argument("--max-file-bytes", type=_bytes, default=DEFAULT_MAX_FILE_BYTES, metavar="BYTES",
                     help="largest file upload to /v1/files (413 above it)")
    srv.add_argument("--fine-tuning-threads", type=int, default=1, metavar="N",
                     help="torch threads of a fine-tuning job's worker process (the engine keeps its own)")
    srv.add_argument("--max-fine-tuning-jobs", type=int, default=1, metavar="N",
                     help="fine-tuning jobs training at once; the others wait, queued")
    srv.add_argument("--max-request-bytes", type=_bytes, default=16 * 2**20, metavar="BYTES",
                     help="largest body of any other request (413 above it, before it is parsed)")
    srv.add_argument("--mix-pool-bytes", type=_bytes, default=None, metavar="BYTES",
                     help="per-request adapter mixes held at once (429 when full; default 256M)")
    srv.add_argument("--grammar-compile-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                     help="a JSON schema, regex or grammar that takes longer to compile is refused (400)")
    srv.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    srv.set_defaults(func=_serve)

    ray = sub.add_parser("ray-serve", help="serve the same API from replicas on Ray Serve, routed by adapter "
                                           "(needs the `ray` extra; server/ray_serve/)")
    for action in srv._actions:  # every `serve` option, kept in step with it (argparse has no public copy)
        if not isinstance(action, argparse._HelpAction) and action.dest != "log_level":
            ray._add_action(action)
    ray.add_argument("--num-replicas", type=int, default=1)
    ray.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local one)")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs (and torch threads) per replica")
    ray.add_argument("--max-ongoing-requests", type=int, default=None,
                     help="requests Ray sends one replica at once (default: 2 x --max-num-seqs)")
    ray.add_argument("--max-models-per-replica", type=int, default=None,
                     help="adapters Ray's multiplexing keeps per replica (default: the pool's adapter slots)")
    ray.add_argument("--min-replicas", type=int, default=None, help="autoscale from this many replicas")
    ray.add_argument("--max-replicas", type=int, default=None, help="autoscale up to this many replicas")
    ray.add_argument("--target-ongoing-requests", type=float, default=None, help="autoscaling target per replica")
    ray.set_defaults(func=_ray_serve)

    gen = sub.add_parser("generate", help="generate offline with the base model and adapters")
    gen.add_argument("--model", default="default", help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    gen.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                     help="register a PEFT adapter folder (repeatable)")
    gen.add_argument("--use", default=None, help="adapter to generate with (default: base and every adapter)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=_generate)

    exp = sub.add_parser("export-merged", help="write an HF checkpoint with a PEFT adapter (DoRA included) "
                                               "merged into the base weights, as PEFT's merge_and_unload does")
    exp.add_argument("--model", default="default", help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    exp.add_argument("--adapter", required=True, metavar="PATH", help="a PEFT adapter folder")
    exp.add_argument("--out", required=True, metavar="DIR", help="the new checkpoint folder (must not exist)")
    exp.set_defaults(func=_export_merged)

    add_finetune_parser(sub)

    sub.add_parser("bench", add_help=False,
                   help="load-test an OpenAI-compatible server (bench/load_test.py; `loramux bench --help`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # every option after `bench` is the load test's own
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
