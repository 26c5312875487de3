"""Kernel benchmark: per-token log-probs from hidden states, providers side by side.

    python -m benchmarks.kernels --device cuda            # the issue's shapes in bf16 (GPU)
    python -m benchmarks.kernels --device cpu --quick     # small shapes: a smoke run of the harness

Providers: `mdpo_fast` (Triton kernels), `mdpo_fast_torch` (the chunked PyTorch fallback) and
`torch_full_logits` (logits materialised, then log-softmax). Modes: forward, backward (of a retained
forward), full (forward + backward) and the peak extra memory of full. FLOPs: `2NHV` forward, `6NHV`
backward (logits recomputed, then the two gradient products), `8NHV` full, counted alike for every
provider so TFLOP/s compare directly; the GPU's own dense bf16 matmul rate is measured in the same run.
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

SHAPES = [(16384, 4096, 128256), (8192, 3584, 152064)]  # Llama-3-8B-like head, Qwen2-7B-like head
QUICK_SHAPES = [(512, 256, 8000)]
PROVIDERS = ("mdpo_fast", "mdpo_fast_torch", "torch_full_logits")
RESULTS = Path(__file__).parent / "results" / "kernels.jsonl"


@contextlib.contextmanager
def backend(name: str):
    old = os.environ.get("MDPO_FAST_BACKEND")
    os.environ["MDPO_FAST_BACKEND"] = name
    try:
        yield
    finally:
        os.environ.pop("MDPO_FAST_BACKEND") if old is None else os.environ.__setitem__("MDPO_FAST_BACKEND", old)


def provider_fn(provider: str):
    from mdpo_fast import linear_token_logprobs
    from mdpo_fast.naive import linear_token_logprobs_naive

    if provider == "torch_full_logits":
        return linear_token_logprobs_naive, contextlib.nullcontext
    name = "triton" if provider == "mdpo_fast" else "torch"
    return linear_token_logprobs, lambda: backend(name)


def setup(n: int, h: int, v: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, device=device, dtype=dtype, generator=g).requires_grad_(True)
    weight = (torch.randn(v, h, device=device, dtype=dtype, generator=g) / h**0.5).requires_grad_(True)
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    labels[torch.rand(n, device=device, generator=g) < 0.05] = -100  # a few prompt tokens mixed in
    grad = torch.randn(n, device=device, generator=g)
    return hidden, weight, labels, grad


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
        return None  # host memory: see benchmarks/logprobs_memory.py
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def matmul_tflops(device: str, dtype: torch.dtype) -> float | None:
    if not device.startswith("cuda"):
        return None
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    b = torch.randn(8192, 8192, device=device, dtype=dtype)
    ms = bench(lambda: a @ b, device)[0]
    return 2 * 8192**3 / ms / 1e9


def timed_modes(fn, hidden, weight, labels, grad, device) -> tuple[dict, float | None]:
    """Median and quantile times of forward, backward and full, and the peak extra memory of full."""

    def forward():
        return fn(hidden, weight, labels)

    def full():
        hidden.grad = weight.grad = None
        forward().backward(grad)

    retained = forward()
    times = {
        "forward": bench(forward, device),
        "backward": bench(lambda: retained.backward(grad, retain_graph=True), device),
        "full": bench(full, device),
    }
    retained = None  # free the retained graph before measuring memory
    return times, peak_extra_mib(full, device)


def run_shape(n, h, v, dtype, device, providers, matmul_rate, results: Path):
    hidden, weight, labels, grad = setup(n, h, v, dtype, device)
    flops = {"forward": 2 * n * h * v, "backward": 6 * n * h * v, "full": 8 * n * h * v}
    rows = []
    for provider in providers:
        fn, ctx = provider_fn(provider)
        try:
            with ctx():
                times, memory = timed_modes(fn, hidden, weight, labels, grad, device)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append({"provider": provider, "error": "out of memory"})
            continue
        row = result_row(
            "linear_logprobs", device=device, dtype=str(dtype).removeprefix("torch."),
            shape={"N": n, "H": h, "V": v}, provider=provider,
            ms={mode: {"median": t[0], "p20": t[1], "p80": t[2]} for mode, t in times.items()},
            tflops={mode: flops[mode] / times[mode][0] / 1e9 for mode in times},
            peak_extra_mib=memory, fp32_logits_mib=n * v * 4 / 2**20, matmul_tflops=matmul_rate,
        )
        write_result(results, row)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes (CPU smoke run)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS))
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.device == "cpu" and "mdpo_fast" in args.providers and os.environ.get("TRITON_INTERPRET") != "1":
        args.providers.remove("mdpo_fast")  # Triton reaches CPU tensors only through the interpreter
    matmul_rate = matmul_tflops(args.device, dtype)
    print(f"device {args.device}; dense {args.dtype} matmul: {matmul_rate and f'{matmul_rate:.0f} TFLOP/s'}")
    for n, h, v in QUICK_SHAPES if args.quick else SHAPES:
        rows = run_shape(n, h, v, dtype, args.device, args.providers, matmul_rate, args.results)
        base = next((r for r in rows if r.get("provider") == "torch_full_logits" and "ms" in r), None)
        print(f"\nN={n} H={h} V={v} {args.dtype}")
        print(f"{'provider':20s} {'fwd ms':>9s} {'bwd ms':>9s} {'full ms':>9s} {'TFLOP/s':>8s} {'% mm':>5s} "
              f"{'extra MiB':>10s} {'vs full-logits':>15s}")
        for r in rows:
            if "ms" not in r:
                print(f"{r['provider']:20s} {r['error']}")
                continue
            ms, full = r["ms"], r["ms"]["full"]["median"]
            share = f"{100 * r['tflops']['full'] / matmul_rate:.0f}" if matmul_rate else "-"
            speed = f"{base['ms']['full']['median'] / full:.2f}x" if base else "-"
            mem = f"{r['peak_extra_mib']:.0f}" if r["peak_extra_mib"] is not None else "-"
            print(f"{r['provider']:20s} {ms['forward']['median']:9.2f} {ms['backward']['median']:9.2f} "
                  f"{full:9.2f} {r['tflops']['full']:8.1f} {share:>5s} {mem:>10s} {speed:>15s}")


if __name__ == "__main__":
    main()
