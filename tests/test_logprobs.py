"""token_logprobs / linear_token_logprobs against full-logits PyTorch, at odd shapes and dtypes."""

import pytest
import torch

import mdpo_fast.ops.chunked as chunked
from mdpo_fast import linear_token_logprobs, segment_logps, token_logprobs
from mdpo_fast.ops.naive import linear_token_logprobs_naive

# Absolute slack on top of "no worse than 2x PyTorch's own error at this dtype", per dtype.
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}

SHAPES = [
    pytest.param(37, 48, 1001, id="N37-H48-V1001"),
    pytest.param(1, 16, 7, id="N1-H16-V7"),
    pytest.param(64, 33, 129, id="N64-H33-V129"),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def _inputs(n, h, v):
    """fp64 inputs (the caller casts them), every third row without a label."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::3] = -100
    grad = torch.randn(n, generator=g, dtype=torch.float32)
    return hidden, weight, bias, labels, grad


def _run(fn, tensors, labels, grad):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves, labels)
    out.backward(grad.to(out.dtype))
    return [out.detach().double()] + [t.grad.double() for t in leaves]


def _assert_no_worse(ours, torch_same, exact, dtype, what):
    for name, a, b, e in zip(("out", *what), ours, torch_same, exact, strict=True):
        err, base = (a - e).abs().max().item(), (b - e).abs().max().item()
        assert err <= 2 * base + ATOL[dtype], f"{name}: error {err:.3g} vs PyTorch's own {base:.3g}"


@pytest.fixture(params=[None, 5], ids=["one-chunk", "many-chunks"])
def chunk_rows(request, monkeypatch):
    if request.param is not None:  # force several chunks, including a ragged last one
        monkeypatch.setattr(chunked, "chunk_rows", lambda vocab_size: request.param)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "h", "v"), SHAPES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_linear_matches_full_logits(n, h, v, dtype, with_bias, chunk_rows):
    hidden, weight, bias, labels, grad = _inputs(n, h, v)
    tensors = [hidden, weight] + ([bias] if with_bias else [])
    what = ("d_hidden", "d_weight") + (("d_bias",) if with_bias else ())

    def ours(h_, w_, *rest):
        *b_, lab = rest
        return linear_token_logprobs(h_, w_, lab, bias=b_[0] if b_ else None)

    def naive(h_, w_, *rest):
        *b_, lab = rest
        return linear_token_logprobs_naive(h_, w_, lab, bias=b_[0] if b_ else None)

    exact = _run(naive, tensors, labels, grad)
    same = [t.to(dtype) for t in tensors]
    got = _run(ours, same, labels, grad)
    assert ours(*same, labels).dtype == torch.float32
    _assert_no_worse(got, _run(naive, same, labels, grad), exact, dtype, what)
    assert (got[0][labels == -100] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_softcapped_logits_match_the_models_formula(dtype, chunk_rows):
    """Gemma 2's `c * tanh(logits / c)` before the softmax: forward and gradients, against full logits."""
    hidden, weight, bias, labels, grad = _inputs(37, 48, 1001)
    hidden = 3 * hidden  # logits spread well past the cap

    def ours(h_, w_, lab):
        return linear_token_logprobs(h_, w_, lab, softcap=2.0)

    def naive(h_, w_, lab):
        return linear_token_logprobs_naive(h_, w_, lab, softcap=2.0)

    exact = _run(naive, [hidden, weight], labels, grad)
    same = [t.to(dtype) for t in (hidden, weight)]
    _assert_no_worse(_run(ours, same, labels, grad), _run(naive, same, labels, grad), exact, dtype,
                     ("d_hidden", "d_weight"))
    uncapped = linear_token_logprobs_naive(hidden, weight, labels)
    assert (uncapped - exact[0]).abs().max() > 1.0  # the cap matters at this spread


def test_all_ignored_and_empty(chunk_rows):
    hidden, weight, _, labels, grad = _inputs(6, 8, 11)
    h = hidden.float().requires_grad_(True)
    w = weight.float().requires_grad_(True)
    out = linear_token_logprobs(h, w, torch.full((6,), -100))
    out.backward(grad)
    assert (out == 0).all() and (h.grad == 0).all() and (w.grad == 0).all()
    empty = linear_token_logprobs(torch.zeros(0, 8), w.detach(), torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,)


def test_non_contiguous_inputs(chunk_rows):
    hidden, weight, _, labels, grad = _inputs(37, 48, 1001)
    h_t = hidden.float().T.contiguous().T  # same values, transposed strides
    w_t = weight.float().T.contiguous().T
    assert not h_t.is_contiguous() and not w_t.is_contiguous()
    got = _run(lambda h_, w_, lab: linear_token_logprobs(h_, w_, lab), [h_t, w_t], labels, grad)
    exact = _run(lambda h_, w_, lab: linear_token_logprobs_naive(h_, w_, lab), [hidden, weight], labels, grad)
    for a, e in zip(got, exact, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_weight_in_other_dtype_gets_fp32_gradient():
    # Mixed precision: fp32 master weight, bf16 activations; the gradient comes back in the weight's dtype.
    hidden, weight, _, labels, grad = _inputs(9, 16, 50)
    w = weight.float().requires_grad_(True)
    linear_token_logprobs(hidden.bfloat16(), w, labels).backward(grad)
    assert w.grad.dtype == torch.float32
    # the same gradient as full logits at the compute precision (the weight cast to bf16, as the matmul takes it)
    w16 = weight.bfloat16().requires_grad_(True)
    linear_token_logprobs_naive(hidden.bfloat16(), w16, labels).backward(grad)
    exact = _run(lambda h_, w_, lab: linear_token_logprobs_naive(h_, w_, lab), [hidden, weight], labels, grad)[2]
    err, base = (w.grad.double() - exact).abs().max(), (w16.grad.double() - exact).abs().max()
    assert err <= 2 * base + ATOL[torch.bfloat16], (err, base)


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs_matches_log_softmax(dtype):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(37, 1001, generator=g, dtype=torch.float64) * 3).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 1001, (37,), generator=g)
    labels[::4] = -100
    upstream = torch.randn(37, generator=g)
    out = token_logprobs(logits, labels)
    out.backward(upstream)
    exact = torch.log_softmax(logits.detach().double(), -1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    exact = torch.where(labels == -100, 0.0, exact)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-5)
    # d logp / d logits = onehot - softmax, scaled by the upstream gradient; zero on ignored rows
    soft = torch.softmax(logits.detach().double(), -1)
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), 1001).double()
    expected = (upstream.double() * (labels != -100))[:, None] * (onehot - soft)
    torch.testing.assert_close(logits.grad.double(), expected, rtol=0, atol=ATOL[dtype] * 2)


def test_segment_logps_sums_per_segment():
    token_logps = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0, -6.0])
    segment_ids = torch.tensor([0, 0, 4, -1, 5, 2])  # example 0 chosen x2, example 1 rejected, -1 skipped, ...
    got = segment_logps(token_logps, segment_ids, num_examples=2)
    torch.testing.assert_close(got, torch.tensor([[-3.0, 0.0, -6.0], [0.0, -3.0, -5.0]]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hidden": torch.zeros(4)}, "hidden must be a 2-D floating-point tensor"),
        ({"weight": torch.zeros(10, 7)}, r"weight must be \[V, 8\]"),
        ({"labels": torch.zeros(4)}, "labels must be a 1-D integer tensor"),
        ({"labels": torch.zeros(3, dtype=torch.long)}, "labels has 3 entries but the inputs have 4 rows"),
        ({"labels": torch.tensor([0, 1, 10, -100])}, r"labels must lie in \[0, 10\)"),
        ({"bias": torch.zeros(9)}, r"bias must be a \[10\] tensor"),
        ({"hidden": torch.zeros(4, 8, dtype=torch.long)}, "hidden must be a 2-D floating-point"),
    ],
    ids=["hidden-1d", "weight-H", "labels-float", "labels-length", "labels-range", "bias-shape", "hidden-int"],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    args = {"hidden": torch.zeros(4, 8), "weight": torch.zeros(10, 8), "labels": torch.zeros(4, dtype=torch.long)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        linear_token_logprobs(**args)


def _peak_extra_mib(impl: str, n: int, h: int, v: int, result) -> None:
    """In a fresh process: how far forward + backward raise the peak resident memory above what its inputs hold."""
    from pathlib import Path

    def kib(field: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
        return int(line.split()[1])

    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) / h**0.5).requires_grad_(True)
    labels, grad = torch.randint(0, v, (n,)), torch.randn(n)
    fn = linear_token_logprobs if impl == "chunked" else linear_token_logprobs_naive
    fn(hidden[:2], weight, labels[:2]).backward(grad[:2])  # allocator and kernels warmed up
    hidden.grad = weight.grad = None
    Path("/proc/self/clear_refs").write_text("5")  # the peak mark back to the current resident size
    base = kib("VmRSS")
    fn(hidden, weight, labels).backward(grad)
    result.put((kib("VmHWM") - base) / 1024)


def test_peak_memory_under_a_quarter_of_full_logits():
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # a fresh allocator: freed memory of other tests hides nothing

    def peak(impl: str) -> float:
        result = context.Queue()
        child = context.Process(target=_peak_extra_mib, args=(impl, n, h, v, result))
        child.start()
        value = result.get(timeout=300)
        child.join()
        return value

    n, h, v = 4096, 256, 32000  # N large enough that one fixed-size chunk is a small share
    chunk, full = peak("chunked"), peak("full_logits")
    assert full > 2 * n * v * 4 / 2**20  # the full path really holds several [N, V] fp32 buffers
    assert chunk < full / 4, f"chunked {chunk:.0f} MiB vs full logits {full:.0f} MiB"
