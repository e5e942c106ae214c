"""LoRA kernel micro-benchmark: shrink + expand of one fused projection over
segments, five ways, for decode (T = 1..256) and prefill shapes, ranks 8..64,
1..64 adapters:

    sgmv        kernels/sgmv.py, the Triton kernels (CUDA only)
    loop        kernels/cpu.py, a torch loop over segments (the CPU path)
    loop_host   the same loop with its tables read to the host once per call
    gather_bmm  pad segments to the longest and ranks to R, gather the pages,
                one torch.bmm for shrink and one for expand
    dense       one GEMM of the same total shape: x @ (all adapters' A stacked),
                then @ (their B stacked); every token meets every adapter, so
                it is not the LoRA result, only the bound a GEMM library sets

On CUDA (bf16, Llama-3-8B shapes) it prints µs (L2 flushed before each call,
and replayed from a CUDA graph), achieved GB/s and TFLOP/s, and two targets
first: decode at T=64 over 64 rank-16 adapters as % of the H200 memory
roofline, and the LoRA share of a Llama-3-8B decoder layer's GEMM time; then
paged decode attention (kernels/paged_attention.py) at Llama-3-8B shapes as %
of the same roofline (--no-attention skips it).
On CPU (fp32, SmolLM2-135M shapes, the model the CPU path serves) it times the
torch variants and says which is fastest, decode and prefill.

    python3 bench/kernels.py [--quick] [--dtype bf16|fp16|fp32] [--no-attention] [--threads N] [--budget-s 150] [--summary FILE]
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loramux.kernels import cpu
from loramux.kernels.segments import Segments, segments_from_runs

H200_BYTES_PER_S = 4.8e12
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (in, slice widths) of the fused projections of one decoder layer
LLAMA3_8B = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)),
             "gate_up": (4096, (14336, 14336)), "down": (14336, (4096,))}
SMOLLM2_135M = {"qkv": (576, (576, 192, 192)), "o": (576, (576,)),
                "gate_up": (576, (1536, 1536)), "down": (1536, (576,))}


# --------------------------------------------------------------------------
# One problem: a paged pool holding `num_adapters` adapters, a batch of tokens


@dataclass
class Problem:
    x: torch.Tensor  # [T, in]
    a_pool: torch.Tensor  # [n, P, in]
    b_pool: torch.Tensor  # [P, out_total]
    page_table: torch.Tensor  # [A, R] int32
    ranks: torch.Tensor  # [n, A] int32
    scales: torch.Tensor  # [n, A] float32
    seg: Segments
    out: torch.Tensor  # [T, out_total]
    offsets: list[int]
    ranks_host: list[int]  # [A] (every slice has the adapter's rank)
    token_counts: list[int]  # [A] tokens of each adapter in the batch

    @property
    def n(self) -> int:
        return self.a_pool.shape[0]

    def bytes_moved(self) -> int:
        """x, the A and B pages of the adapters in use, h written and read, out read and written."""
        e = self.x.element_size()
        in_f, out_total = self.x.shape[1], self.offsets[-1]
        used = [r for r, c in zip(self.ranks_host, self.token_counts) if c]
        weights = sum(r * (self.n * in_f + out_total) for r in used)
        h = sum(2 * self.n * r * c for r, c in zip(self.ranks_host, self.token_counts))
        return e * (self.x.numel() + weights + h + 2 * self.x.shape[0] * out_total)

    def flops(self) -> int:
        in_f, out_total = self.x.shape[1], self.offsets[-1]
        return sum(2 * r * c * (self.n * in_f + out_total) for r, c in zip(self.ranks_host, self.token_counts))


def make_problem(num_tokens, num_adapters, rank, in_f, widths, dtype, device, seed=0) -> Problem:
    """Tokens dealt round-robin to adapters, then grouped adapter by adapter
    (as the model runner orders them); each adapter in a contiguous run of
    pages, adapters at shuffled places in the pool. rank 0 means mixed: 8..64."""
    gen = torch.Generator().manual_seed(seed)
    ranks = [rank or (8, 16, 32, 64)[i % 4] for i in range(num_adapters)]
    max_rank = max(ranks)
    order = torch.randperm(num_adapters, generator=gen).tolist()
    page_table = torch.zeros(num_adapters, max_rank, dtype=torch.int32)
    next_page = 0
    for a in order:
        page_table[a, : ranks[a]] = torch.arange(next_page, next_page + ranks[a], dtype=torch.int32)
        next_page += ranks[a]
    n, out_total = len(widths), sum(widths)
    counts = [num_tokens // num_adapters + (a < num_tokens % num_adapters) for a in range(num_adapters)]
    starts = [sum(counts[:a]) for a in range(num_adapters)]
    seg = segments_from_runs(starts, counts, range(num_adapters), num_tokens, device=device)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    return Problem(
        x=rand(num_tokens, in_f),
        a_pool=rand(n, next_page, in_f, scale=in_f**-0.5),
        b_pool=rand(next_page, out_total, scale=0.1),
        page_table=page_table.to(device),
        ranks=torch.tensor([ranks] * n, dtype=torch.int32, device=device),
        scales=torch.full((n, num_adapters), 2.0, device=device),
        seg=seg,
        out=rand(num_tokens, out_total),
        offsets=[0, *torch.tensor(widths).cumsum(0).tolist()],
        ranks_host=ranks,
        token_counts=counts,
    )


# --------------------------------------------------------------------------
# The measured alternatives (not library code)


def run_sgmv(p: Problem, out: torch.Tensor) -> None:
    from loramux.kernels import sgmv

    h = sgmv.lora_shrink(p.x, p.a_pool, p.page_table, p.ranks, p.seg)
    sgmv.lora_expand(h, p.b_pool, p.page_table, p.ranks, p.scales, p.seg, out, p.offsets)


def run_loop(p: Problem, out: torch.Tensor) -> None:
    h = cpu.lora_shrink(p.x, p.a_pool, p.page_table, p.ranks, p.seg)
    cpu.lora_expand(h, p.b_pool, p.page_table, p.ranks, p.scales, p.seg, out, p.offsets)


def run_loop_host(p: Problem, out: torch.Tensor) -> None:
    """kernels/cpu.py's loop with ranks, scales and page_table read to the host
    once per call instead of element by element inside the loop."""
    ranks, scales, table = p.ranks.tolist(), p.scales.tolist(), p.page_table.tolist()

    def pages(slot, r):  # a slice when the pages run contiguously, as the pool allocates them
        first = table[slot][0]
        return slice(first, first + r) if table[slot][r - 1] - first == r - 1 else p.page_table[slot, :r].long()

    runs = p.seg.with_adapter()
    h = p.x.new_empty(p.n, p.x.shape[0], p.page_table.shape[1])
    for start, length, slot in runs:
        for s in range(p.n):
            if r := ranks[s][slot]:
                torch.matmul(p.x[start : start + length], p.a_pool[s, pages(slot, r)].T,
                             out=h[s, start : start + length, :r])
    for start, length, slot in runs:
        for s in range(p.n):
            if r := ranks[s][slot]:
                lo, hi = p.offsets[s], p.offsets[s + 1]
                out[start : start + length, lo:hi].addmm_(
                    h[s, start : start + length, :r], p.b_pool[pages(slot, r), lo:hi], alpha=scales[s][slot])


def run_gather_bmm(p: Problem, out: torch.Tensor) -> None:
    """Pad every segment to the longest (L) and every rank to R, gather, two bmm:

        xg [S, L, in] @ ag [S, in, n*R] -> h [S, L, n*R]
        h @ bg [S, n*R, out] (slice s's rank rows only in its own columns) -> delta [S, L, out]
    """
    seg, n, R = p.seg, p.n, p.page_table.shape[1]
    L, dev = seg.max_len, p.x.device
    ar = torch.arange(max(L, R), device=dev)
    valid = (ar[:L] < seg.lens[:, None]) & (seg.slots[:, None] >= 0)  # [S, L]
    tok = torch.where(valid, seg.starts[:, None] + ar[:L], 0).long()  # [S, L]
    xg = p.x[tok] * valid[..., None]  # [S, L, in]
    slot = seg.slots.clamp(min=0).long()
    pages = p.page_table[slot].long()  # [S, R]
    live = ar[None, None, :R] < p.ranks[:, slot, None]  # [n, S, R]
    ag = (p.a_pool[:, pages] * live[..., None]).transpose(0, 1).reshape(len(slot), n * R, -1)  # [S, n*R, in]
    h = torch.bmm(xg, ag.transpose(1, 2))  # [S, L, n*R]
    bg = p.b_pool.new_zeros(len(slot), n, R, p.b_pool.shape[1])  # [S, n, R, out]
    b_rows = p.b_pool[pages]  # [S, R, out]
    for s in range(n):
        lo, hi = p.offsets[s], p.offsets[s + 1]
        w = live[s] * p.scales[s, slot][:, None]  # [S, R]
        bg[:, s, :, lo:hi] = b_rows[:, :, lo:hi] * w[..., None].to(bg.dtype)
    delta = torch.bmm(h, bg.reshape(len(slot), n * R, -1))  # [S, L, out]
    out.index_put_((tok.flatten(),), (delta * valid[..., None]).flatten(0, 1), accumulate=True)


def dense_weights(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """All adapters' rank rows stacked: A_all [n*sum(r), in], B_all [n*sum(r), out]."""
    a_rows, b_rows = [], []
    for s in range(p.n):
        lo, hi = p.offsets[s], p.offsets[s + 1]
        for a, r in enumerate(p.ranks_host):
            pages = p.page_table[a, :r].long()
            a_rows.append(p.a_pool[s, pages])
            b = torch.zeros(r, p.b_pool.shape[1], dtype=p.b_pool.dtype, device=p.b_pool.device)
            b[:, lo:hi] = p.b_pool[pages, lo:hi]
            b_rows.append(b)
    return torch.cat(a_rows), torch.cat(b_rows)


def run_dense(x: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor, out: torch.Tensor) -> None:
    out.addmm_(x @ a_all.T, b_all)


# --------------------------------------------------------------------------
# Timing


def time_cpu(fn, min_s: float, max_reps: int = 200) -> float:
    """Fastest of repeated calls, after one warm-up call: on a shared CPU the
    other users only ever add time."""
    fn()
    times, total = [], 0.0
    while total < min_s and len(times) < max_reps:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        total += times[-1]
    return min(times)


def time_cuda(fn, graph: bool) -> float:
    """Seconds per call. graph=False: triton's do_bench, which flushes L2
    before every call (and its flush kernel hides most of the Python launch
    time), so weights come from HBM as in a real decode step. graph=True:
    back-to-back replays from a CUDA graph, no launch cost, L2 warm."""
    import triton.testing

    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e-3
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e-3


# --------------------------------------------------------------------------
# Sweeps


def shapes(quick: bool, cuda: bool) -> list[tuple[str, int, int, int]]:
    """(kind, T, adapters, rank); rank 0 = mixed 8..64."""
    if quick:
        decode = [(1, 1, 16), (8, 8, 16), (16, 16, 16), (64, 8, 16), (64, 64, 16), (64, 64, 0), (256, 64, 16)]
        prefill = [(256, 1, 16), (256, 4, 0), (1024, 4, 64)]
    elif cuda:
        decode = [(t, a, r) for t in (1, 8, 32, 64, 128, 256) for a in (1, 8, 64) if a <= t for r in (8, 16, 64)]
        decode += [(64, 64, 0), (256, 64, 0)]
        prefill = [(t, a, r) for t in (512, 2048) for a in (1, 4, 16) for r in (16, 64)] + [(2048, 16, 0)]
    else:
        decode = [(t, a, r) for t in (1, 8, 64, 256) for a in (1, 8, 64) if a <= t for r in (8, 64)]
        decode += [(64, 64, 0)]
        prefill = [(t, a, r) for t in (256, 1024) for a in (1, 4, 16) for r in (16, 64)]
    return [("decode", *s) for s in decode] + [("prefill", *s) for s in prefill]


def check_same(p: Problem, variant, name: str) -> None:
    """Each variant must compute what kernels/cpu.py computes before it is timed."""
    want, got = p.out.clone(), p.out.clone()
    run_loop(p, want)
    variant(p, got)
    tol = 1e-4 if p.x.dtype == torch.float32 else 3e-2
    scale = (want - p.out).abs().max().item()
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(scale, 1e-6), msg=lambda m: f"{name}: {m}")


def measure(p: Problem, cuda: bool, min_s: float) -> dict[str, float]:
    """Seconds per call of each variant (on CUDA also 'sgmv_graph', 'dense_graph')."""
    variants = {"loop": run_loop, "loop_host": run_loop_host, "gather_bmm": run_gather_bmm}
    if cuda:
        variants = {"sgmv": run_sgmv, **variants}
    for name, fn in variants.items():
        if name != "loop":
            check_same(p, fn, name)
    a_all, b_all = dense_weights(p)
    out = p.out.clone()
    calls = {name: (lambda fn=fn: fn(p, out)) for name, fn in variants.items()}
    calls["dense"] = lambda: run_dense(p.x, a_all, b_all, out)
    if not cuda:
        return {name: time_cpu(fn, min_s) for name, fn in calls.items()}
    times = {name: time_cuda(fn, graph=False) for name, fn in calls.items()}
    times["sgmv_graph"] = time_cuda(calls["sgmv"], graph=True)
    times["dense_graph"] = time_cuda(calls["dense"], graph=True)
    return times


def cuda_targets(dtype: torch.dtype, dev: str = "cuda") -> list[tuple[str, str]]:
    """The two H200 targets, on L2-flushed times; CUDA-graph (L2-warm) times alongside."""
    p = make_problem(64, 64, 16, *LLAMA3_8B["qkv"], dtype, dev)
    check_same(p, run_sgmv, "sgmv")
    out = p.out.clone()
    cold = time_cuda(lambda: run_sgmv(p, out), graph=False)
    graph = time_cuda(lambda: run_sgmv(p, out), graph=True)
    roofline = p.bytes_moved() / H200_BYTES_PER_S
    rows = [("decode qkv T=64, 64 x r16: % of HBM roofline",
             f"{100 * roofline / cold:.1f}%  ({cold * 1e6:.1f} us, {p.bytes_moved() / cold / 1e9:.0f} GB/s; "
             f"roofline {roofline * 1e6:.1f} us for {p.bytes_moved() / 1e6:.1f} MB; graph {graph * 1e6:.1f} us)")]

    lora = base = lora_graph = base_graph = 0.0
    for name, (in_f, widths) in LLAMA3_8B.items():
        p = make_problem(64, 64, 16, in_f, widths, dtype, dev, seed=1)
        w = torch.randn(in_f, sum(widths), device=dev, dtype=dtype) * in_f**-0.5
        x, out = p.x, p.out.clone()  # x: [64, in], w: [in, out_total]
        lora += time_cuda(lambda: run_sgmv(p, out), graph=False)
        base += time_cuda(lambda: torch.matmul(x, w), graph=False)
        lora_graph += time_cuda(lambda: run_sgmv(p, out), graph=True)
        base_graph += time_cuda(lambda: torch.matmul(x, w), graph=True)
    rows.append(("Llama-3-8B layer decode T=64, 64 x r16: LoRA / base GEMMs",
                 f"{100 * lora / base:.1f}%  (LoRA {lora * 1e6:.1f} us, base {base * 1e6:.1f} us; "
                 f"graph: {100 * lora_graph / base_graph:.1f}%, {lora_graph * 1e6:.1f} / {base_graph * 1e6:.1f} us)"))
    return rows


# --------------------------------------------------------------------------
# Paged decode attention (kernels/paged_attention.py), CUDA only

# Llama-3-8B attention: 32 query heads over 8 kv heads of 128; (batch, context) per row
ATTENTION_SHAPES = ((64, 1024), (8, 4096))


def attention_targets(dtype: torch.dtype, dev: str = "cuda") -> list[tuple[str, str]]:
    """One decode step of Llama-3-8B attention over a paged cache (blocks of 16 at
    shuffled places in the pool) as % of the H200 memory roofline: every K and V
    row of every context read once, q and out once. L2-flushed times."""
    from loramux.kernels import reference
    from loramux.kernels.paged_attention import paged_decode_attention

    heads, kv_heads, head_dim, block_size = 32, 8, 128, 16
    rows = []
    for batch, ctx in ATTENTION_SHAPES:
        gen = torch.Generator().manual_seed(batch * ctx)
        blocks = ctx // block_size
        table = torch.randperm(batch * blocks, generator=gen).view(batch, blocks).to(dev, torch.int32)
        k_cache = torch.randn(batch * ctx, kv_heads, head_dim, device=dev, dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        q = torch.randn(batch, heads, head_dim, device=dev, dtype=dtype)
        lens = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
        out = torch.empty_like(q)

        def call():
            paged_decode_attention(q, k_cache, v_cache, table, lens, block_size, head_dim**-0.5, out=out)

        call()
        want = reference.paged_decode_attention_ref(q[:2], k_cache, v_cache, table[:2], lens[:2], block_size,
                                                    head_dim**-0.5)
        torch.testing.assert_close(out[:2].float(), want, rtol=2e-2, atol=2e-2, msg=lambda m: f"attention: {m}")
        moved = 2 * k_cache.numel() * k_cache.element_size() + 2 * q.numel() * q.element_size() + table.numel() * 4
        cold, graph = time_cuda(call, graph=False), time_cuda(call, graph=True)
        roofline = moved / H200_BYTES_PER_S
        rows.append((f"paged decode attention B={batch} ctx={ctx}: % of HBM roofline",
                     f"{100 * roofline / cold:.1f}%  ({cold * 1e6:.1f} us, {moved / cold / 1e9:.0f} GB/s; "
                     f"roofline {roofline * 1e6:.1f} us for {moved / 1e6:.1f} MB; graph {graph * 1e6:.1f} us)"))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few shapes, short timings (< 60 s on a CPU)")
    ap.add_argument("--dtype", choices=DTYPES, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop the sweep after this long")
    ap.add_argument("--summary", help="also write the summary table to this file")
    ap.add_argument("--no-attention", action="store_true", help="skip the paged decode attention rows (CUDA)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); on a "
                    "shared machine 1 avoids waiting on a busy core at every parallel op")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    layer = LLAMA3_8B if cuda else SMOLLM2_135M
    in_f, widths = layer["qkv"]
    began = time.perf_counter()
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'} ({torch.get_num_threads()} threads), "
          f"dtype {dtype}, qkv in={in_f} out={widths}")

    summary: list[tuple[str, str]] = []
    if cuda:
        summary += cuda_targets(dtype)
        if not args.no_attention:
            summary += attention_targets(dtype)
        for label, value in summary:
            print(f"TARGET {label}: {value}")

    names = ["loop", "loop_host", "gather_bmm", "dense"]
    if cuda:
        names = ["sgmv", "sgmv_graph", *names, "dense_graph"]
    header = f"{'kind':8}{'T':>6}{'ad':>4}{'rank':>6} " + "".join(f"{n + ' us':>15}" for n in names)
    print(header + ("   sgmv GB/s  TFLOP/s" if cuda else "   fastest torch"))
    wins: dict[str, dict[str, int]] = {"decode": {}, "prefill": {}}
    skipped = 0
    for kind, t, a, r in shapes(args.quick, cuda):
        if time.perf_counter() - began > args.budget_s:
            skipped += 1
            continue
        p = make_problem(t, a, r, in_f, widths, dtype, dev)
        times = measure(p, cuda, min_s=0.2 if args.quick else 0.5)
        torch_names = ["loop", "loop_host", "gather_bmm"]  # dense is a bound, not a LoRA result
        best = min(torch_names, key=times.get)
        wins[kind][best] = wins[kind].get(best, 0) + 1
        row = f"{kind:8}{t:>6}{a:>4}{r or '8-64':>6} " + "".join(f"{times[n] * 1e6:>15.1f}" for n in names)
        if cuda:
            t_sgmv = times["sgmv"]
            row += f"   {p.bytes_moved() / t_sgmv / 1e9:9.0f}  {p.flops() / t_sgmv / 1e12:7.2f}"
        else:
            row += f"   {best} ({times['loop'] / times[best]:.2f}x loop)"
        print(row, flush=True)
    if skipped:
        print(f"(budget of {args.budget_s:.0f} s spent: {skipped} shapes skipped)")

    for kind, w in wins.items():
        summary.append((f"fastest torch variant, {kind}", ", ".join(f"{k} {v}x" for k, v in sorted(w.items())) or "-"))
    summary.append(("bench wall time", f"{time.perf_counter() - began:.0f} s"))
    width = max([58] + [len(label) for label, _ in summary])  # bench/gpu_check.sh prints its rows at 58
    table = "\n".join(f"{label:<{width}}  {value}" for label, value in summary)
    print("\n== kernel benchmark summary ==\n" + table)
    if args.summary:
        Path(args.summary).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
