"""CPU timings of the PyTorch paths through pytest-benchmark (not part of the test run):

    pytest benchmarks/test_cpu_kernels.py --benchmark-only

Same setups as `benchmarks/kernels.py`, so CPU and GPU rows describe the same work.
"""

import pytest
import torch

from benchmarks.kernels import OPS, backend

SHAPE = (1024, 256, 8000)


@pytest.mark.parametrize("op", ["linear", "mdpo", "logits"])
@pytest.mark.parametrize("provider", ["mdpo_fast_torch", "torch"])
def test_full_step(benchmark, op, provider):
    providers, leaves, grad = OPS[op](*SHAPE, torch.float32, "cpu")
    if provider not in providers:
        pytest.skip(f"{op} has no {provider} provider")
    forward, backend_name = providers[provider]

    def full():
        for leaf in leaves:
            leaf.grad = None
        forward().backward(grad)

    with backend(backend_name):
        benchmark(full)
