"""Peak extra host memory of forward + backward of linear log-probs: chunked path vs full logits.

    python -m benchmarks.logprobs_memory                # N=8192 H=1024 V=32000 fp32, writes results
    python -m benchmarks.logprobs_memory 2048 256 32000

Each measurement runs in a fresh process: inputs are built, the peak-RSS mark is reset
(/proc/self/clear_refs), forward + backward run, and the rise of the peak over the baseline is
reported. On CPU this is the deterministic measure docs/DESIGN.md ("Performance") asks for; GPU memory is
measured by the GPU benchmark script instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

IMPLS = ("chunked", "full_logits")
RESULTS = Path(__file__).parent / "results" / "logprobs_memory_cpu.jsonl"


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(impl: str, n: int, h: int, v: int, dtype: str) -> None:
    import gc

    import torch

    from mdpo_fast.ops.logprobs import linear_token_logprobs
    from mdpo_fast.ops.naive import linear_token_logprobs_naive

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    hidden = torch.randn(n, h, dtype=dt, requires_grad=True)
    weight = (torch.randn(v, h, dtype=dt) / h**0.5).requires_grad_(True)
    labels = torch.randint(0, v, (n,))
    grad = torch.randn(n)
    fn = linear_token_logprobs if impl == "chunked" else linear_token_logprobs_naive
    fn(hidden[:2], weight, labels[:2]).backward(grad[:2])  # warm up allocator and kernels
    hidden.grad = weight.grad = None
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark to the current RSS
    base = _status_kib("VmRSS")
    fn(hidden, weight, labels).backward(grad)
    print(json.dumps({"extra_mib": (_status_kib("VmHWM") - base) / 1024}))


def peak_extra_mib(impl: str, n: int, h: int, v: int, dtype: str = "float32") -> float:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.logprobs_memory", "--child", impl, str(n), str(h), str(v), dtype],
        check=True, capture_output=True, text=True, cwd=Path(__file__).parent.parent,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"]


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--child":
        _child(argv[1], *(int(x) for x in argv[2:5]), argv[5])
        return
    n, h, v = (int(x) for x in argv[:3]) if argv else (8192, 1024, 32000)
    from benchmarks.record import result_row, write_result

    extra = {impl: peak_extra_mib(impl, n, h, v) for impl in IMPLS}
    full_logits_mib = n * v * 4 / 2**20
    row = result_row(
        "linear_logprobs_memory", device="cpu", dtype="float32", shape={"N": n, "H": h, "V": v},
        peak_extra_mib=extra, ratio=extra["chunked"] / extra["full_logits"], fp32_logits_mib=full_logits_mib,
    )
    write_result(RESULTS, row)
    print(
        f"N={n} H={h} V={v} fp32 forward+backward peak extra memory: chunked {extra['chunked']:.0f} MiB, "
        f"full logits {extra['full_logits']:.0f} MiB, ratio {row['ratio']:.3f} "
        f"(one [N, V] fp32 = {full_logits_mib:.0f} MiB)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
