"""Triton log-prob kernels against the fp64 naive reference; on CPU they run under TRITON_INTERPRET=1."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch
import triton

from mdpo_fast.ops.kernels import linear_logprobs as lin
from mdpo_fast.ops.kernels import logits_logprobs as lgt
from mdpo_fast.ops.kernels.config import (
    LINEAR_BWD,
    LINEAR_BWD_INTERPRET,
    LINEAR_FWD,
    LINEAR_FWD_INTERPRET,
    vocab_splits,
)
from mdpo_fast.ops.logprobs import linear_token_logprobs, token_logprobs
from mdpo_fast.ops.naive import linear_token_logprobs_naive, token_logprobs_naive
from mdpo_fast.ops.rows import valid_rows

# The kernel's max error against fp64 may be FACTOR x PyTorch's own error at the same dtype, plus ATOL.
FACTOR = 2.0
ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Case:
    n: int
    h: int
    v: int
    dtype: torch.dtype = torch.float32
    bias: bool = False
    ignored: str = "some"  # "some": every 3rd row from the 2nd, "none", "all"
    layout: str = "contiguous"  # "transposed": unit stride along N; "row_stride": a column slice of a wider tensor
    weight_dtype: torch.dtype | None = None  # None: the input dtype
    ignore_index: int = -100
    softcap: float | None = None  # Gemma 2's final logit soft-capping

    @property
    def id(self) -> str:
        parts = [f"N{self.n}"] + ([f"H{self.h}"] if self.h else []) + [f"V{self.v}", DTYPE_NAMES[self.dtype]]
        parts += ["bias"] if self.bias else []
        parts += [f"{self.ignored}-ignored"] if self.ignored != "some" else []
        parts += [self.layout] if self.layout != "contiguous" else []
        parts += [f"weight-{DTYPE_NAMES[self.weight_dtype]}"] if self.weight_dtype else []
        parts += [f"ignore{self.ignore_index}"] if self.ignore_index != -100 else []
        parts += [f"softcap{self.softcap:g}"] if self.softcap else []
        return "-".join(parts)


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    # The public functions, forced onto the Triton launchers (CPU tensors reach them through the interpreter).
    monkeypatch.setenv("MDPO_FAST_BACKEND", "triton")


def triton_linear(hidden, weight, labels, ignore_index=-100, bias=None, softcap=None):
    return linear_token_logprobs(hidden, weight, labels, ignore_index, bias, softcap)


def _params(cases):
    return [pytest.param(c, id=c.id) for c in cases]


LINEAR_CASES = _params(
    [
        Case(37, 48, 1001),
        Case(37, 48, 1001, torch.bfloat16),
        Case(37, 48, 1001, torch.float16),
        Case(37, 48, 1001, torch.bfloat16, bias=True),
        Case(1, 16, 20),  # V smaller than one vocab block
        Case(5, 40, 50, torch.bfloat16, bias=True, ignored="none"),
        Case(37, 48, 1001, torch.bfloat16, ignored="all"),
        Case(37, 48, 1001, torch.bfloat16, layout="transposed"),
        Case(37, 48, 1001, torch.float32, bias=True, layout="row_stride"),
        Case(37, 48, 1001, torch.bfloat16, bias=True, weight_dtype=torch.float32),
        Case(19, 24, 130, torch.float16, ignore_index=-1),
        Case(37, 48, 1001, softcap=1.5),  # a cap below the logits' spread: it changes them
        Case(37, 48, 1001, torch.bfloat16, bias=True, softcap=1.5),
    ]
)
LOGITS_CASES = _params(
    [
        Case(37, 0, 1001),
        Case(37, 0, 1001, torch.bfloat16),
        Case(37, 0, 1001, torch.float16),
        Case(1, 0, 20),
        Case(37, 0, 1001, torch.bfloat16, ignored="all"),
        Case(37, 0, 1001, torch.bfloat16, layout="row_stride"),
        Case(37, 0, 1001, torch.float32, layout="transposed"),
        Case(19, 0, 130, torch.float16, ignored="none", ignore_index=-1),
    ]
)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    n, d = x.shape
    if layout == "transposed":
        out = torch.empty(d, n, dtype=x.dtype).T
    elif layout == "row_stride":
        out = torch.empty(n, d + 7, dtype=x.dtype)[:, :d]
    else:
        return x
    return out.copy_(x)


def _labels(case: Case, g: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, case.v, (case.n,), generator=g)
    if case.ignored == "some":
        labels[1::3] = case.ignore_index
    elif case.ignored == "all":
        labels[:] = case.ignore_index
    return labels


def _linear_inputs(case: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = _layout(torch.randn(case.n, case.h, generator=g).to(case.dtype), case.layout)
    # logits with std ~2, so the softmax is neither flat nor one-hot
    weight = (2 * torch.randn(case.v, case.h, generator=g) / case.h**0.5).to(case.weight_dtype or case.dtype)
    bias = torch.randn(case.v, generator=g).to(case.dtype) if case.bias else None
    grad = torch.randn(case.n, generator=g)  # random upstream gradient, ignored rows included
    return hidden, weight, bias, _labels(case, g), grad


def _leaves(tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(True) for t in tensors]


def _run_linear(fn, hidden, weight, bias, labels, grad, case, dtype=None):
    h, w, b = _leaves([hidden, weight, bias], dtype)
    out = fn(h, w, labels, ignore_index=case.ignore_index, bias=b, softcap=case.softcap)
    out.backward(grad.to(out.dtype))
    return {"logps": out, "d_hidden": h.grad, "d_weight": w.grad} | ({"d_bias": b.grad} if b is not None else {})


def _assert_no_worse(ours: dict, same_dtype: dict, exact: dict, dtype: torch.dtype) -> None:
    for name, e in exact.items():
        err = (ours[name].double() - e).abs().max().item()
        base = (same_dtype[name].double() - e).abs().max().item()
        assert err <= FACTOR * base + ATOL[dtype], f"{name}: error {err:.3g} vs PyTorch's own {base:.3g}"


@pytest.mark.parametrize("case", LINEAR_CASES)
def test_linear_matches_reference(case):
    hidden, weight, bias, labels, grad = _linear_inputs(case)
    ours = _run_linear(triton_linear, hidden, weight, bias, labels, grad, case)
    same = _run_linear(linear_token_logprobs_naive, hidden, weight, bias, labels, grad, case)
    exact = _run_linear(linear_token_logprobs_naive, hidden, weight, bias, labels, grad, case, torch.float64)

    assert ours["logps"].dtype == torch.float32
    for name, x in (("d_hidden", hidden), ("d_weight", weight), ("d_bias", bias)):
        if x is not None:
            assert ours[name].dtype == x.dtype and ours[name].shape == x.shape, name
    ignored = labels == case.ignore_index
    assert (ours["logps"][ignored] == 0).all() and (ours["d_hidden"][ignored] == 0).all()
    _assert_no_worse(ours, same, exact, case.dtype)


def test_linear_weight_without_grad():
    # LoRA: the LM head is frozen, so no d_weight buffer and only d_hidden flows.
    case = Case(37, 48, 1001, torch.bfloat16)
    hidden, weight, _, labels, grad = _linear_inputs(case)
    h = hidden.clone().requires_grad_(True)
    triton_linear(h, weight, labels).backward(grad)
    h64 = hidden.double().requires_grad_(True)
    linear_token_logprobs_naive(h64, weight.double(), labels).backward(grad.double())
    h_same = hidden.clone().requires_grad_(True)
    linear_token_logprobs_naive(h_same, weight, labels).backward(grad)
    _assert_no_worse({"d_hidden": h.grad}, {"d_hidden": h_same.grad}, {"d_hidden": h64.grad}, case.dtype)


@pytest.fixture
def nan_empty(monkeypatch):
    """`torch.empty` that fills floats with NaN, so an output element no kernel writes cannot pass."""
    empty = torch.empty

    def nan_filled(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(math.nan) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_filled)


SPLIT_CONFIGS = [
    pytest.param(replace(LINEAR_FWD_INTERPRET, min_programs=1), id="one-vocab-split"),
    pytest.param(replace(LINEAR_FWD_INTERPRET, min_programs=1000), id="vocab-split-per-block"),
    pytest.param(replace(LINEAR_FWD, min_programs=4), id="gpu-tiles"),  # tiles wider than H: masks only
]


@pytest.mark.parametrize("fwd_config", SPLIT_CONFIGS)
@pytest.mark.parametrize(
    "case", _params([Case(37, 48, 1001, torch.bfloat16, bias=True), Case(20, 16, 1001, torch.float32)])
)
def test_linear_launchers(case, fwd_config, nan_empty):
    hidden, weight, bias, labels, grad = _linear_inputs(case)
    valid = labels != case.ignore_index
    logps, lse = lin.linear_logprobs_fwd(hidden, weight, labels, bias, case.ignore_index, config=fwd_config)

    logits = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    exact_lse = torch.where(valid, torch.logsumexp(logits, dim=-1), 0.0)
    exact = linear_token_logprobs_naive(hidden.double(), weight.double(), labels, case.ignore_index, bias)
    assert (logps[~valid] == 0).all() and (lse[~valid] == 0).all()
    tol = 1e-5 if case.dtype == torch.float32 else 1e-3
    torch.testing.assert_close(logps.double(), exact.double(), atol=tol, rtol=0)
    torch.testing.assert_close(lse.double(), exact_lse, atol=tol, rtol=tol)

    # Each gradient alone, from per-token upstream values; the others must not be formed.
    rows = valid_rows(labels, case.ignore_index)
    full = lin.linear_logprobs_bwd(grad, hidden, weight, labels, lse, bias, case.ignore_index, rows)
    names = ("hidden", "weight", "bias")
    for i, name in enumerate(names):
        flags = {f"need_{k}": k == name for k in names}
        alone = lin.linear_logprobs_bwd(grad, hidden, weight, labels, lse, bias, case.ignore_index, rows, **flags)
        assert [g is None for g in alone] == [k != name or (k == "bias" and bias is None) for k in names], name
        if alone[i] is not None:
            assert alone[i].isfinite().all()
            torch.testing.assert_close(alone[i], full[i], atol=1e-6, rtol=0)


def test_linear_backward_configs_agree(nan_empty):
    # Group sizes that do and do not divide the row-block count, and the GPU tiles, give the same gradients.
    case = Case(37, 48, 1001, torch.float32, bias=True)
    hidden, weight, bias, labels, grad = _linear_inputs(case)
    _, lse = lin.linear_logprobs_fwd(hidden, weight, labels, bias)
    configs = [replace(LINEAR_BWD_INTERPRET, group_n=k) for k in (1, 2, 5)] + [LINEAR_BWD]
    grads = [lin.linear_logprobs_bwd(grad, hidden, weight, labels, lse, bias, config=c) for c in configs]
    for other in grads[1:]:
        for a, b in zip(grads[0], other, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_vocab_splits_cover_the_vocab():
    for n_row_blocks in (1, 3, 7, 500):
        for n_vocab_blocks in (1, 2, 16, 1001):
            splits, per_split = vocab_splits(n_row_blocks, n_vocab_blocks, target_programs=264)
            assert (splits - 1) * per_split < n_vocab_blocks <= splits * per_split  # none empty, none missing
            # rounding to equal slices may at most halve the split count asked for
            assert 2 * n_row_blocks * splits >= min(264, n_row_blocks * n_vocab_blocks)


def _logits_inputs(case: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = _layout((3 * torch.randn(case.n, case.v, generator=g)).to(case.dtype), case.layout)
    return logits, _labels(case, g), torch.randn(case.n, generator=g)


def _run_logits(fn, logits, labels, grad, case, dtype=None):
    (x,) = _leaves([logits], dtype)
    out = fn(x, labels, ignore_index=case.ignore_index)
    out.backward(grad.to(out.dtype))
    return {"logps": out, "d_logits": x.grad}


@pytest.mark.parametrize("case", LOGITS_CASES)
def test_logits_matches_reference(case):
    logits, labels, grad = _logits_inputs(case)
    ours = _run_logits(token_logprobs, logits, labels, grad, case)
    same = _run_logits(token_logprobs_naive, logits, labels, grad, case)
    exact = _run_logits(token_logprobs_naive, logits, labels, grad, case, torch.float64)

    assert ours["logps"].dtype == torch.float32 and ours["d_logits"].dtype == case.dtype
    ignored = labels == case.ignore_index
    assert (ours["logps"][ignored] == 0).all() and (ours["d_logits"][ignored] == 0).all()
    _assert_no_worse(ours, same, exact, case.dtype)


@pytest.mark.parametrize(
    "case", _params([Case(37, 0, 1001, torch.bfloat16, layout="row_stride"), Case(6, 0, 20, ignore_index=-1)])
)
def test_logits_launchers(case, nan_empty):
    logits, labels, grad = _logits_inputs(case)
    valid = labels != case.ignore_index
    logps, lse = lgt.logits_logprobs_fwd(logits, labels, case.ignore_index)
    exact = token_logprobs_naive(logits.double(), labels, case.ignore_index)
    torch.testing.assert_close(logps.double(), exact.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(lse.double(), torch.where(valid, logits.double().logsumexp(-1), 0.0), atol=1e-5, rtol=0)

    grad_logits = lgt.logits_logprobs_bwd(grad, logits, labels, lse, case.ignore_index)
    x = logits.double().requires_grad_(True)
    token_logprobs_naive(x, labels, case.ignore_index).backward(grad.double())
    atol = 1e-6 if case.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad_logits.double(), x.grad, atol=atol, rtol=0)
    assert (grad_logits[~valid] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or triton.knobs.runtime.interpret,
    reason="needs CUDA and compiled kernels (run with TRITON_INTERPRET=0)",
)
class TestOnGPU:
    """Realistic shapes on the GPU: a Llama-sized LM head and answer-token counts of one mDPO batch."""

    @pytest.mark.parametrize(("n", "h", "v"), [pytest.param(2011, 4096, 32064, id="N2011-H4096-V32064-bf16")])
    def test_linear_matches_reference(self, n, h, v):
        case = Case(n, h, v, torch.bfloat16)
        hidden, weight, bias, labels, grad = (
            None if t is None else t.cuda() for t in _linear_inputs(case)
        )  # fmt: skip
        ours = _run_linear(triton_linear, hidden, weight, bias, labels, grad, case)
        same = _run_linear(linear_token_logprobs_naive, hidden, weight, bias, labels, grad, case)
        exact = _run_linear(linear_token_logprobs_naive, hidden, weight, bias, labels, grad, case, torch.float64)
        _assert_no_worse(ours, same, exact, case.dtype)

    def test_linear_memory_stays_below_logits(self):
        # Frozen LM head (LoRA): forward + backward must need far less than the fp32 [N, V] logits.
        n, h, v = 8192, 4096, 128256
        hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        weight = torch.randn(v, h, device="cuda", dtype=torch.bfloat16) / h**0.5
        labels = torch.randint(0, v, (n,), device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        triton_linear(hidden, weight, labels).backward(torch.randn(n, device="cuda"))
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - start
        assert extra < n * v * 4 / 10, f"{extra / 2**20:.0f} MiB extra"

    @pytest.mark.parametrize(("n", "v"), [pytest.param(4093, 128256, id="N4093-V128256-bf16")])
    def test_logits_matches_reference(self, n, v):
        case = Case(n, 0, v, torch.bfloat16)
        logits, labels, grad = (t.cuda() for t in _logits_inputs(case))
        ours = _run_logits(token_logprobs, logits, labels, grad, case)
        same = _run_logits(token_logprobs_naive, logits, labels, grad, case)
        exact = _run_logits(token_logprobs_naive, logits, labels, grad, case, torch.float64)
        _assert_no_worse(ours, same, exact, case.dtype)


def test_an_interpreter_that_cannot_run_with_this_numpy_says_so(monkeypatch):
    """Triton 3.6's interpreter fails mid-launch with numpy >= 2.4 (a numpy TypeError): one clear line instead."""
    import numpy as np

    from mdpo_fast.ops.kernels import config

    for triton_version, numpy_version, fails in [("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False),
                                                 ("3.9.0", "2.4.6", False)]:
        monkeypatch.setattr(triton, "__version__", triton_version)
        monkeypatch.setattr(np, "__version__", numpy_version)
        config.check_interpreter.cache_clear()
        if fails:
            with pytest.raises(RuntimeError, match="cannot run with numpy 2.4.6: install numpy<2.4"):
                config.check_interpreter()
        else:
            config.check_interpreter()
    config.check_interpreter.cache_clear()


# The vocabularies users train with: LLaVA-1.5 (Llama 2 + image token), Llama 3, Qwen2-VL / Qwen2.5-VL-7B and
# Qwen2.5-VL-3B / Qwen3-VL, Gemma 3. None is a multiple of the vocab block, so the ragged last block is masked.
REAL_VOCABS = (32064, 128256, 151936, 152064, 262208)


@pytest.mark.parametrize("v", REAL_VOCABS)
def test_linear_at_real_vocabulary_sizes(v, monkeypatch):
    """A handful of rows, a small hidden size, the whole vocabulary: labels at its ragged end and its start, an
    ignored row; forward and backward against fp64 full logits, with a random upstream gradient."""
    from mdpo_fast.ops.kernels import config

    for name in ("LINEAR_FWD_INTERPRET", "LINEAR_BWD_INTERPRET"):  # the interpreter's time is per program
        monkeypatch.setattr(config, name, replace(getattr(config, name), block_v=1024))
    case = Case(5, 16, v)
    hidden, weight, _, _, grad = _linear_inputs(case)
    labels = torch.tensor([v - 1, 0, -100, v - 2, v // 2])
    weight[v - 1] += hidden[0]  # the last entry is the likeliest token of row 0: the masking must not drop it
    ours = _run_linear(triton_linear, hidden, weight, None, labels, grad, case)
    exact = _run_linear(linear_token_logprobs_naive, hidden, weight, None, labels, grad, case, torch.float64)
    same = _run_linear(linear_token_logprobs_naive, hidden, weight, None, labels, grad, case)
    assert ours["logps"][2] == 0 and (ours["d_hidden"][2] == 0).all()
    assert ours["d_weight"][v - 1].abs().sum() > 0  # the ragged last row of the head gets its gradient
    _assert_no_worse(ours, same, exact, torch.float32)


class _Refused:
    """A kernel that must not launch."""

    def __init__(self, name):
        self.name = name

    def __getitem__(self, grid):
        raise AssertionError(f"{self.name} launched")


def triton_linear_deterministic(hidden, weight, labels, ignore_index=-100, bias=None, softcap=None):
    return linear_token_logprobs(hidden, weight, labels, ignore_index, bias, softcap, deterministic=True)


@pytest.mark.parametrize("case", LINEAR_CASES)
def test_deterministic_backward_matches_reference(case, monkeypatch):
    """No float atomics (the atomic kernel refused): each gradient entry is summed by one program in a fixed order."""
    monkeypatch.setattr(lin, "_linear_logprobs_bwd_kernel", _Refused("the atomic backward"))
    hidden, weight, bias, labels, grad = _linear_inputs(case)
    ours = _run_linear(triton_linear_deterministic, hidden, weight, bias, labels, grad, case)
    same = _run_linear(linear_token_logprobs_naive, hidden, weight, bias, labels, grad, case)
    exact = _run_linear(linear_token_logprobs_naive, hidden, weight, bias, labels, grad, case, torch.float64)
    for name, x in (("d_hidden", hidden), ("d_weight", weight), ("d_bias", bias)):
        if x is not None:
            assert ours[name].dtype == x.dtype and ours[name].shape == x.shape, name
    assert (ours["d_hidden"][labels == case.ignore_index] == 0).all()
    _assert_no_worse(ours, same, exact, case.dtype)


def test_deterministic_mode_follows_torch_and_reaches_the_fused_loss(monkeypatch):
    """`torch.use_deterministic_algorithms(True)` (what --full_determinism sets) picks the deterministic kernels for
    the log-probs and the fused loss; otherwise the atomic one runs."""
    from mdpo_fast.ops import fused_linear_mdpo_loss

    case = Case(19, 24, 130)
    hidden, weight, _, labels, grad = _linear_inputs(case)
    segments = torch.arange(case.n) % 6
    atomic, hidden_kernel = lin._linear_logprobs_bwd_kernel, lin._linear_logprobs_bwd_hidden_kernel
    for deterministic in (True, False):
        if deterministic:
            monkeypatch.setattr(lin, "_linear_logprobs_bwd_kernel", _Refused("the atomic backward"))
        else:
            monkeypatch.setattr(lin, "_linear_logprobs_bwd_kernel", atomic)
            monkeypatch.setattr(lin, "_linear_logprobs_bwd_hidden_kernel", _Refused("the deterministic backward"))
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic)
        try:
            _run_linear(triton_linear, hidden, weight, None, labels, grad, case)
            h = hidden.clone().requires_grad_(True)
            loss, _ = fused_linear_mdpo_loss(h, weight, labels, segments, torch.zeros(2, 3))
            loss.backward()
        finally:
            torch.use_deterministic_algorithms(previous)
    monkeypatch.setattr(lin, "_linear_logprobs_bwd_hidden_kernel", hidden_kernel)
