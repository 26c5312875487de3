"""fused_linear_mdpo_loss on both backends against an independent float64 reading of docs/DESIGN.md's objective.

The independent version loops segment by segment: full logits for that segment's tokens, log-softmax,
sum, then the formula. The packed call must agree with it for any token order.
"""

import pytest
import torch
import torch.nn.functional as F

from mdpo_fast import MDPOLoss, fused_linear_mdpo_loss
from mdpo_fast.ops.naive import linear_token_logprobs_naive

ATOL = {torch.float32: 2e-5, torch.bfloat16: 5e-3}
BACKENDS = ["torch", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("MDPO_FAST_BACKEND", request.param)
    return request.param


def independent_loss(hidden, weight, labels, segment_ids, ref_logps, beta, anchor, weights, bias=None, softcap=None):
    """docs/DESIGN.md's objective with plain torch ops in the inputs' dtype, a segment at a time (no mdpo_fast code)."""
    b = ref_logps.shape[0]
    policy = []
    for s in range(3 * b):
        take = (segment_ids == s) & (labels != -100)
        logits = hidden[take] @ weight.to(hidden.dtype).T
        if bias is not None:
            logits = logits + bias.to(hidden.dtype)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
        policy.append(logp.gather(1, labels[take][:, None]).sum())
    policy = torch.stack(policy).view(b, 3)
    r = beta * (policy - ref_logps.to(policy.dtype))
    per_example = (
        -weights[0] * F.logsigmoid(r[:, 0] - r[:, 1])
        - weights[1] * F.logsigmoid(r[:, 0] - r[:, 2])
        - weights[2] * F.logsigmoid(r[:, 0] - anchor)
    )
    return per_example.mean(), policy


def _case(seed, n, h, v, b):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    bias = torch.randn(v, generator=g, dtype=torch.float64) * 0.1
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.2] = -100
    segment_ids = torch.randint(-1, 3 * b, (n,), generator=g)  # examples and branches interleaved
    segment_ids[0] = 3 * b - 1  # the last segment exists ...
    labels[segment_ids == 1] = -100  # ... and segment 1 (example 0 rejected) has only ignored labels
    single = (segment_ids == 2).nonzero()  # example 0's corrupted branch: one token
    segment_ids[single[1:]] = -1
    ref_logps = -torch.rand(b, 3, generator=g, dtype=torch.float64) * 40
    options = {"beta": 0.05 + float(torch.rand(1, generator=g)), "anchor": float(torch.randn(1, generator=g)),
               "weights": tuple(torch.rand(3, generator=g).tolist())}
    upstream = torch.randn((), generator=g, dtype=torch.float64)
    return hidden, weight, bias, labels, segment_ids, ref_logps, options, upstream


CASES = [
    pytest.param(0, 23, 16, 37, 2, id="N23-H16-V37-B2"),
    pytest.param(1, 41, 24, 130, 3, id="N41-H24-V130-B3"),
    pytest.param(2, 60, 40, 257, 4, id="N60-H40-V257-B4"),
    pytest.param(3, 9, 16, 19, 1, id="N9-H16-V19-B1"),
]


def _grads(fn, hidden, weight, bias, upstream):
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss, extra = fn(*leaves)
    (loss * upstream.to(loss.dtype)).backward()
    return [loss.detach().double()] + [t.grad.double() for t in leaves], extra


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize(("seed", "n", "h", "v", "b"), CASES)
def test_matches_independent_float64(backend, seed, n, h, v, b, dtype):
    hidden, weight, bias, labels, segment_ids, ref_logps, options, upstream = _case(seed, n, h, v, b)

    def ours(h_, w_, b_):
        loss, metrics = fused_linear_mdpo_loss(h_, w_, labels, segment_ids, ref_logps.float(), bias=b_, **options)
        return loss, metrics

    def independent(h_, w_, b_):
        return independent_loss(h_, w_, labels, segment_ids, ref_logps, bias=b_, **options)

    exact, exact_policy = _grads(independent, hidden, weight, bias, upstream)
    same = [t.to(dtype) for t in (hidden, weight, bias)]
    got, metrics = _grads(ours, *same, upstream)
    pytorch_same, _ = _grads(independent, *same, upstream)
    for name, a, p, e in zip(("loss", "d_hidden", "d_weight", "d_bias"), got, pytorch_same, exact, strict=True):
        err, base = (a - e).abs().max().item(), (p - e).abs().max().item()
        assert err <= 2 * base + ATOL[dtype], f"{name}: error {err:.3g} vs PyTorch's own {base:.3g}"
    assert metrics["policy_logps"].dtype == torch.float32
    torch.testing.assert_close(metrics["policy_logps"].double(), exact_policy.detach(), rtol=0,
                               atol=1e-4 if dtype == torch.float32 else 0.5)
    assert metrics["policy_logps"][0, 1] == 0  # the segment whose labels are all ignored sums to 0


def test_softcapped_logits(backend):
    """Final logit soft-capping (Gemma 2) inside the fused loss, both backends, against the independent loss."""
    hidden, weight, bias, labels, segment_ids, ref_logps, options, upstream = _case(1, 41, 24, 130, 3)
    hidden = 4 * hidden  # logits past the cap

    def ours(h_, w_, b_):
        return fused_linear_mdpo_loss(h_, w_, labels, segment_ids, ref_logps.float(), bias=b_, softcap=1.5, **options)

    def independent(h_, w_, b_):
        return independent_loss(h_, w_, labels, segment_ids, ref_logps, bias=b_, softcap=1.5, **options)

    exact, exact_policy = _grads(independent, hidden, weight, bias, upstream)
    got, metrics = _grads(ours, *(t.float() for t in (hidden, weight, bias)), upstream)
    for name, a, e in zip(("loss", "d_hidden", "d_weight", "d_bias"), got, exact, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=name)
    uncapped, _ = independent_loss(hidden, weight, labels, segment_ids, ref_logps, bias=bias, **options)
    assert (uncapped - exact[0]).abs() > 1e-2  # the cap matters here


def test_token_order_does_not_matter(backend):
    hidden, weight, bias, labels, segment_ids, ref_logps, options, _ = _case(5, 30, 16, 37, 3)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    h = hidden.float().requires_grad_(True)
    loss, m = fused_linear_mdpo_loss(h, weight.float(), labels, segment_ids, ref_logps.float(), **options)
    hp = hidden.float()[perm].requires_grad_(True)
    loss_p, m_p = fused_linear_mdpo_loss(hp, weight.float(), labels[perm], segment_ids[perm], ref_logps.float(),
                                         **options)
    torch.testing.assert_close(loss_p, loss)
    g = torch.autograd.grad(loss, h)[0]
    torch.testing.assert_close(torch.autograd.grad(loss_p, hp)[0], g[perm])


def test_metrics_match_mdpo_loss_on_the_sums(backend):
    from mdpo_fast import METRIC_NAMES, mdpo_loss

    hidden, weight, _, labels, segment_ids, ref_logps, options, _ = _case(6, 41, 24, 130, 3)
    loss, metrics = fused_linear_mdpo_loss(hidden.float(), weight.float(), labels, segment_ids, ref_logps.float(),
                                           **options)
    # the sums from full logits, apart from the fused call: its metrics must be the objective's on them
    tokens = linear_token_logprobs_naive(hidden.float(), weight.float(), torch.where(segment_ids >= 0, labels, -100))
    keep = segment_ids >= 0
    sums = torch.zeros(9).index_add(0, segment_ids[keep], tokens[keep]).view(3, 3)
    torch.testing.assert_close(metrics["policy_logps"], sums, rtol=0, atol=1e-4)
    expected_loss, expected = mdpo_loss(sums, ref_logps.float(), **options)
    torch.testing.assert_close(loss, expected_loss)
    for name in METRIC_NAMES:
        torch.testing.assert_close(metrics[name], expected[name], msg=name)


def test_reference_hidden_in_the_same_call(backend):
    hidden, weight, bias, labels, segment_ids, _, options, _ = _case(7, 41, 24, 130, 3)
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    answer_labels = torch.where(segment_ids >= 0, labels, -100)
    ref_tokens = linear_token_logprobs_naive(ref_hidden.float(), weight.float(), answer_labels, bias=bias.float())
    ref_logps = torch.zeros(9).index_add(0, segment_ids[segment_ids >= 0], ref_tokens[segment_ids >= 0]).view(3, 3)
    h1 = hidden.float().requires_grad_(True)
    h2 = hidden.float().requires_grad_(True)
    a, ma = fused_linear_mdpo_loss(h1, weight.float(), labels, segment_ids, ref_logps, bias=bias.float(), **options)
    b, mb = fused_linear_mdpo_loss(h2, weight.float(), labels, segment_ids, ref_hidden=ref_hidden.float(),
                                   bias=bias.float(), num_examples=3, **options)
    torch.testing.assert_close(mb["ref_logps"], ref_logps, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(b, h2)[0], torch.autograd.grad(a, h1)[0], rtol=1e-4, atol=1e-6)


def test_non_contiguous_hidden(backend):
    hidden, weight, _, labels, segment_ids, ref_logps, options, _ = _case(8, 23, 16, 37, 2)
    h_t = hidden.float().T.contiguous().T.requires_grad_(True)
    h = hidden.float().requires_grad_(True)
    a, _ = fused_linear_mdpo_loss(h, weight.float(), labels, segment_ids, ref_logps.float(), **options)
    b, _ = fused_linear_mdpo_loss(h_t, weight.float(), labels, segment_ids, ref_logps.float(), **options)
    torch.testing.assert_close(b, a)
    torch.testing.assert_close(torch.autograd.grad(b, h_t)[0], torch.autograd.grad(a, h)[0])


def test_module_wraps_the_function():
    hidden, weight, _, labels, segment_ids, ref_logps, options, _ = _case(9, 23, 16, 37, 2)
    module = MDPOLoss(**options)
    a, _ = module(hidden.float(), weight.float(), labels, segment_ids, ref_logps.float())
    b, _ = fused_linear_mdpo_loss(hidden.float(), weight.float(), labels, segment_ids, ref_logps.float(), **options)
    torch.testing.assert_close(a, b)
    assert "beta=" in repr(module)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"segment_ids": torch.tensor([0, 1, 2, 6])}, r"segment_ids must lie in \[-1, 6\)"),
        ({"segment_ids": torch.tensor([0, 1, -2, 3])}, r"segment_ids must lie in \[-1, 6\)"),
        ({"segment_ids": torch.tensor([0, 1, 2])}, "segment_ids has 3 entries but hidden has 4 rows"),
        ({"segment_ids": torch.tensor([0.0, 1, 2, 3])}, "segment_ids must be a 1-D integer tensor"),
        ({"ref_logps": torch.zeros(2, 2)}, r"ref_logps must be a \[B, 3\] tensor"),
        ({"ref_logps": None}, "give ref_logps"),
        ({"ref_hidden": torch.zeros(4, 8)}, "not both"),
        ({"ref_logps": None, "ref_hidden": torch.zeros(3, 8)}, "ref_hidden must have hidden's shape"),
        ({"labels": torch.tensor([0, 1, 2, 99])}, r"labels must lie in \[0, 10\)"),
        ({"beta": -1.0}, "beta must be > 0"),
    ],
    ids=["seg-high", "seg-low", "seg-length", "seg-float", "ref-shape", "no-ref", "both-refs", "ref-hidden-shape",
         "label-range", "beta"],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    args = {"hidden": torch.zeros(4, 8), "weight": torch.zeros(10, 8), "labels": torch.tensor([0, 1, 2, 3]),
            "segment_ids": torch.tensor([0, 1, 2, 3]), "ref_logps": torch.zeros(2, 3)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fused_linear_mdpo_loss(args.pop("hidden"), args.pop("weight"), args.pop("labels"), args.pop("segment_ids"),
                               **args)
