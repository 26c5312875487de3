"""The Triton kernels compile for sm_90 (H100) at their production tile sizes, without a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.compile_sm90 import H100_SHARED_BYTES


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler, not the interpreter
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = Path(__file__).parent.parent
    out = subprocess.run([sys.executable, "tests/compile_sm90.py"], capture_output=True, text=True, env=env,
                         cwd=root, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_every_kernel_variant_compiles(compiled):
    names = {row["kernel"] for row in compiled}
    for dtype in ("bf16", "fp16", "fp32"):
        assert {f"logits_fwd-{dtype}", f"logits_bwd-{dtype}"} <= names
        for bias in ("bias", "nobias", "nobias-softcap"):
            assert {f"linear_fwd-{dtype}-{bias}", f"linear_bwd-{dtype}-{bias}-dh+dw",
                    f"linear_bwd-{dtype}-{bias}-dh"} <= names


def test_shared_memory_fits_an_h100(compiled):
    for row in compiled:
        assert row["shared_bytes"] <= H100_SHARED_BYTES, row
        assert row["local"] == 0, row


def test_no_kernel_spills_registers(compiled):
    # A spill shows as stack bytes: per-thread local memory, read and written in the inner loops.
    assert [row["kernel"] for row in compiled if row["stack"]] == []


def test_a_new_batch_length_does_not_recompile(compiled):
    # Triton's launcher keys its cache on every integer argument's value class (1, divisible by 16, other): a batch
    # length that were such an argument would compile up to three variants as lengths change. Ours are not.
    with_lengths = [row for row in compiled if row["per_batch_args"]]
    assert {row["kernel"].split("-")[0] for row in with_lengths} >= {
        "linear_fwd", "linear_bwd", "linear_bwd_deterministic_hidden", "linear_bwd_deterministic_weight"}
    for row in compiled:
        assert row["length_variants"] == 1, row
