"""Command line: `loramux generate ...` (and `python -m server ...`)."""
from __future__ import annotations

import argparse
import sys


def _generate(args) -> int:
    from server.llm import LLM
    from server.peft_format import AdapterError
    from server.sampling import SamplingParams

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loramux", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
