"""Kernel benchmarks: one harness, one setup per op, providers side by side.

    python -m benchmarks.kernels --device cuda                         # every op at the issue's shapes, bf16
    python -m benchmarks.kernels --device cuda --op linear --sweep     # tokens N swept at fixed H, V, + a plot
    python -m benchmarks.kernels --device cpu --quick --dtype float32  # small shapes: a smoke run of the harness

Ops: `linear` (per-token log-probs from hidden states), `logits` (from materialised logits) and `mdpo`
(the whole three-branch loss from hidden states, 3 examples' worth of segments per 1000 tokens).
Providers: `mdpo_fast` (Triton), `mdpo_fast_torch` (the chunked PyTorch fallback), `torch` (full
logits, then log-softmax) and, when installed, `liger` and `cce` (apple's cut-cross-entropy,
`reduction="none"`); a peer whose API does not fit is reported, not fatal. Modes: forward, backward
(of a retained forward), full and the peak extra memory of full. FLOPs `2NHV` / `6NHV` / `8NHV`
(forward / backward with recompute / full) for every provider alike, against the GPU's own dense
matmul rate measured in the same run. GPU timing is `triton.testing.do_bench` (median, p20, p80).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.record import result_row, write_result

# Llama-3-8B-like head, Qwen2-7B-like head, Gemma-3-4B-like head (V=262208: where full logits run out of memory)
SHAPES = [(16384, 4096, 128256), (8192, 3584, 152064), (8192, 2560, 262208)]
QUICK_SHAPES = [(512, 256, 8000)]
SWEEP_N = [1024, 2048, 4096, 8192, 16384]
RESULTS = Path(__file__).parent / "results"


@contextlib.contextmanager
def backend(name: str | None):
    old = os.environ.get("MDPO_FAST_BACKEND")
    if name:
        os.environ["MDPO_FAST_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MDPO_FAST_BACKEND", None)
        else:
            os.environ["MDPO_FAST_BACKEND"] = old


def _inputs(n, h, v, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, device=device, dtype=dtype, generator=g).requires_grad_(True)
    weight = (torch.randn(v, h, device=device, dtype=dtype, generator=g) / h**0.5).requires_grad_(True)
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    labels[torch.rand(n, device=device, generator=g) < 0.05] = -100  # a few prompt tokens mixed in
    return hidden, weight, labels


def setup_linear(n, h, v, dtype, device):
    """Providers: name -> (forward fn returning [N], leaves, upstream gradient, backend)."""
    from mdpo_fast import linear_token_logprobs
    from mdpo_fast.ops.naive import linear_token_logprobs_naive

    hidden, weight, labels = _inputs(n, h, v, dtype, device)
    grad = torch.randn(n, device=device)
    providers = {
        "mdpo_fast": (lambda: linear_token_logprobs(hidden, weight, labels), "triton"),
        # no float atomics in the backward (bitwise-equal runs), at one more logit recompute
        "mdpo_fast_deterministic": (lambda: linear_token_logprobs(hidden, weight, labels, deterministic=True),
                                    "triton"),
        "mdpo_fast_torch": (lambda: linear_token_logprobs(hidden, weight, labels), "torch"),
        "torch": (lambda: linear_token_logprobs_naive(hidden, weight, labels), None),
    }
    with contextlib.suppress(ImportError):
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
        providers["liger"] = (lambda: -loss(weight, hidden, labels), None)
    with contextlib.suppress(ImportError):
        from cut_cross_entropy import linear_cross_entropy

        providers["cce"] = (lambda: -linear_cross_entropy(hidden, weight, labels, reduction="none"), None)
    return providers, (hidden, weight), grad


def setup_logits(n, h, v, dtype, device):
    from mdpo_fast import token_logprobs
    from mdpo_fast.ops.naive import token_logprobs_naive

    g = torch.Generator(device=device).manual_seed(0)
    logits = (3 * torch.randn(n, v, device=device, dtype=dtype, generator=g)).requires_grad_(True)
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    grad = torch.randn(n, device=device)
    providers = {
        "mdpo_fast": (lambda: token_logprobs(logits, labels), "triton"),
        "torch": (lambda: token_logprobs_naive(logits, labels), None),
    }
    return providers, (logits,), grad


def setup_mdpo(n, h, v, dtype, device):
    from mdpo_fast import fused_linear_mdpo_loss, mdpo_loss, segment_logps
    from mdpo_fast.ops.naive import linear_token_logprobs_naive

    hidden, weight, labels = _inputs(n, h, v, dtype, device)
    b = max(1, 3 * n // 1000 // 3)
    segment_ids = torch.arange(n, device=device) * (3 * b) // n  # contiguous segments of equal length
    ref = -torch.rand(b, 3, device=device) * 100

    def naive():
        logps = linear_token_logprobs_naive(hidden, weight, torch.where(segment_ids >= 0, labels, -100))
        return mdpo_loss(segment_logps(logps, segment_ids, b), ref)[0]

    fused = lambda: fused_linear_mdpo_loss(hidden, weight, labels, segment_ids, ref)[0]  # noqa: E731
    providers = {"mdpo_fast": (fused, "triton"), "mdpo_fast_torch": (fused, "torch"), "torch": (naive, None)}
    return providers, (hidden, weight), torch.ones((), device=device)


OPS = {"linear": setup_linear, "logits": setup_logits, "mdpo": setup_mdpo}


def bench(fn, device: str, rep_ms: int = 500) -> tuple[float, float, float]:
    """(median, p20, p80) in ms."""
    if device.startswith("cuda"):
        import triton

        return tuple(triton.testing.do_bench(fn, warmup=100, rep=rep_ms, quantiles=[0.5, 0.2, 0.8]))
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=5)
    return statistics.median(times), q[0], q[-1]


def peak_extra_mib(fn, device: str) -> float | None:
    if not device.startswith("cuda"):
        return None  # host memory: benchmarks/logprobs_memory.py measures it in a fresh process
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def timed_modes(forward, leaves, grad, device) -> tuple[dict, float | None]:
    def full():
        for leaf in leaves:
            leaf.grad = None
        forward().backward(grad)

    retained = forward()
    times = {
        "forward": bench(forward, device),
        "backward": bench(lambda: retained.backward(grad, retain_graph=True), device),
        "full": bench(full, device),
    }
    retained = None  # free the retained graph before measuring memory
    return times, peak_extra_mib(full, device)


def matmul_tflops(device: str, dtype: torch.dtype) -> float | None:
    if not device.startswith("cuda"):
        return None
    a, b = (torch.randn(8192, 8192, device=device, dtype=dtype) for _ in range(2))
    return 2 * 8192**3 / bench(lambda: a @ b, device)[0] / 1e9


def run(op, n, h, v, dtype, device, wanted, matmul_rate, results: Path) -> list[dict]:
    providers, leaves, grad = OPS[op](n, h, v, dtype, device)
    flops = {"forward": 2 * n * h * v, "backward": 6 * n * h * v, "full": 8 * n * h * v}
    rows = []
    for name, (forward, backend_name) in providers.items():
        if wanted and name not in wanted:
            continue
        if backend_name == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            continue  # Triton reaches CPU tensors only through the interpreter
        try:
            with backend(backend_name):
                times, memory = timed_modes(forward, leaves, grad, device)
        except Exception as e:  # a peer's API drift or an out-of-memory baseline: report it, keep going
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            rows.append({"provider": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        row = result_row(
            f"kernel_{op}", device=device, dtype=str(dtype).removeprefix("torch."), shape={"N": n, "H": h, "V": v},
            provider=name, ms={m: {"median": t[0], "p20": t[1], "p80": t[2]} for m, t in times.items()},
            tflops={m: flops[m] / times[m][0] / 1e9 for m in times}, peak_extra_mib=memory,
            fp32_logits_mib=n * v * 4 / 2**20, matmul_tflops=matmul_rate,
        )
        write_result(results, row)
        rows.append(row)
    return rows


def print_table(op, n, h, v, dtype_name, rows, matmul_rate):
    base = next((r for r in rows if r.get("provider") == "torch" and "ms" in r), None)
    print(f"\n{op}  N={n} H={h} V={v} {dtype_name}")
    print(f"{'provider':16s} {'fwd ms':>9s} {'bwd ms':>9s} {'full ms':>9s} {'TFLOP/s':>8s} {'% mm':>5s} "
          f"{'extra MiB':>10s} {'vs torch':>9s}")
    for r in rows:
        if "ms" not in r:
            print(f"{r['provider']:16s} {r['error']}")
            continue
        ms, full = r["ms"], r["ms"]["full"]["median"]
        share = f"{100 * r['tflops']['full'] / matmul_rate:.0f}" if matmul_rate else "-"
        speed = f"{base['ms']['full']['median'] / full:.2f}x" if base else "-"
        mem = f"{r['peak_extra_mib']:.0f}" if r["peak_extra_mib"] is not None else "-"
        print(f"{r['provider']:16s} {ms['forward']['median']:9.2f} {ms['backward']['median']:9.2f} {full:9.2f} "
              f"{r['tflops']['full']:8.1f} {share:>5s} {mem:>10s} {speed:>9s}")


def plot_sweep(op, h, v, dtype_name, rows_by_n: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    providers = sorted({r["provider"] for rows in rows_by_n.values() for r in rows if "ms" in r})
    for provider in providers:
        points = [(n, r) for n, rows in rows_by_n.items() for r in rows if r.get("provider") == provider and "ms" in r]
        ns = [n for n, _ in points]
        axes[0].plot(ns, [r["ms"]["full"]["median"] for _, r in points], marker="o", label=provider)
        if points[0][1]["peak_extra_mib"] is not None:
            axes[1].plot(ns, [r["peak_extra_mib"] for _, r in points], marker="o", label=provider)
    device = next(r["device"] for rows in rows_by_n.values() for r in rows if "device" in r)
    for ax, label in zip(axes, ("forward + backward, ms (median)", "peak extra memory, MiB"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens N")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        else:  # CPU: host memory is measured in a fresh process by benchmarks/logprobs_memory.py
            ax.text(0.5, 0.5, "GPU only", ha="center", transform=ax.transAxes)
    fig.suptitle(f"{op}: H={h} V={v} {dtype_name} on {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--op", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--quick", action="store_true", help="small shapes (CPU smoke run)")
    parser.add_argument("--sweep", action="store_true", help="sweep tokens N at the first shape's H and V")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--providers", nargs="+", default=None)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    matmul_rate = matmul_tflops(args.device, dtype)
    print(f"device {args.device}; dense {args.dtype} matmul: {matmul_rate and f'{matmul_rate:.0f} TFLOP/s'}")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    results = args.results / f"kernels_{args.device.split(':')[0]}.jsonl"
    for op in args.op:
        if args.sweep:
            _, h, v = shapes[0]
            ns = [n for n in SWEEP_N if n <= shapes[0][0]] if not args.quick else [128, 256, 512]
            rows_by_n = {n: run(op, n, h, v, dtype, args.device, args.providers, matmul_rate, results) for n in ns}
            for n, rows in rows_by_n.items():
                print_table(op, n, h, v, args.dtype, rows, matmul_rate)
            plot_sweep(op, h, v, args.dtype, rows_by_n, args.results / f"{op}_sweep_{args.device.split(':')[0]}.png")
            continue
        for n, h, v in shapes:
            rows = run(op, n, h, v, dtype, args.device, args.providers, matmul_rate, results)
            print_table(op, n, h, v, args.dtype, rows, matmul_rate)


if __name__ == "__main__":
    main()
