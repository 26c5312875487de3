"""mdpo_loss: hand-worked numbers, and agreement with an independent float64 reading of docs/DESIGN.md's objective."""

import math

import pytest
import torch

from mdpo_fast import METRIC_NAMES, mdpo_loss


def _nls(x: float) -> float:  # -log sigmoid(x), computed stably
    return math.log1p(math.exp(-x)) if x > 0 else -x + math.log1p(math.exp(x))


def independent_mdpo(policy, ref, beta, anchor, weights):
    """docs/DESIGN.md's formula, example by example, in Python floats (float64)."""
    total = 0.0
    for p, r in zip(policy.tolist(), ref.tolist(), strict=True):
        rc, rr, rm = (beta * (a - b) for a, b in zip(p, r, strict=True))
        total += weights[0] * _nls(rc - rr) + weights[1] * _nls(rc - rm) + weights[2] * _nls(rc - anchor)
    return total / len(policy)


def test_hand_worked_example():
    # r_chosen = 0.1 * (-10 + 11) = 0.1, r_rejected = -0.1, r_corrupted = 0
    # L = log(1 + e^-0.2) + log(1 + e^-0.1) + log(1 + e^-0.1) = 0.5981389 + 0.6443967 + 0.6443967
    policy = torch.tensor([[-10.0, -12.0, -11.0]])
    ref = torch.tensor([[-11.0, -11.0, -11.0]])
    loss, m = mdpo_loss(policy, ref)
    assert loss.item() == pytest.approx(1.8869322, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.1)
    assert m["rewards/rejected"].item() == pytest.approx(-0.1)
    assert m["rewards/imageless_chosen"].item() == pytest.approx(0.0)
    assert m["rewards/margins"].item() == pytest.approx(0.2)
    assert m["rewards/imageless_margins"].item() == pytest.approx(0.1)
    assert m["rewards/accuracies"].item() == 1.0
    assert m["rewards/imageless_accuracies"].item() == 1.0
    assert [m[k].item() for k in ("logps/chosen", "logps/rejected", "logps/imageless_chosen")] == [-10, -12, -11]


def test_hand_worked_weights_anchor_beta():
    # beta 0.5: r = (0.5, -0.5, 0); anchor 1: log(1 + e^-1) * 2 + log(1 + e^0.5) * 0.5 + log(1 + e^-0.5) * 0
    policy = torch.tensor([[-10.0, -12.0, -11.0]])
    ref = torch.tensor([[-11.0, -11.0, -11.0]])
    loss, _ = mdpo_loss(policy, ref, beta=0.5, anchor=1.0, weights=(0.0, 0.5, 2.0))
    expected = 0.5 * math.log(1 + math.exp(-0.5)) + 2.0 * math.log(1 + math.exp(0.5))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_two_examples_accuracies_are_shares():
    policy = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, -4.0]])
    _, m = mdpo_loss(policy, torch.zeros(2, 3))
    assert m["rewards/accuracies"].item() == 0.5  # only example 0 has r_chosen > r_rejected
    assert m["rewards/imageless_accuracies"].item() == 0.5  # only example 1 has r_chosen > r_corrupted


@pytest.mark.parametrize("seed", range(5))
def test_matches_independent_float64(seed):
    g = torch.Generator().manual_seed(seed)
    b = int(torch.randint(1, 9, (1,), generator=g))
    policy = -50 * torch.rand(b, 3, generator=g, dtype=torch.float64)
    ref = policy + torch.randn(b, 3, generator=g, dtype=torch.float64) * 20
    beta, anchor = 0.05 + float(torch.rand(1, generator=g)), float(torch.randn(1, generator=g))
    weights = tuple(torch.rand(3, generator=g).tolist())
    policy.requires_grad_(True)
    loss, _ = mdpo_loss(policy, ref, beta=beta, anchor=anchor, weights=weights)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(independent_mdpo(policy, ref, beta, anchor, weights), rel=1e-12)
    # gradient: dL/dp_chosen = -beta/B * sum_k w_k sigmoid(-(margin_k)), dL/dp_rej = beta/B w0 sigmoid(-m0), ...
    (grad,) = torch.autograd.grad(loss, policy)
    sig = lambda x: 1 / (1 + math.exp(x))  # noqa: E731  sigmoid(-x)
    for i, (p, r) in enumerate(zip(policy.tolist(), ref.tolist(), strict=True)):
        rc, rr, rm = (beta * (a - c) for a, c in zip(p, r, strict=True))
        d_rej, d_cor = weights[0] * sig(rc - rr), weights[1] * sig(rc - rm)
        d_chosen = -(d_rej + d_cor + weights[2] * sig(rc - anchor))
        expected = torch.tensor([d_chosen, d_rej, d_cor], dtype=torch.float64) * beta / b
        torch.testing.assert_close(grad[i], expected, rtol=1e-10, atol=1e-12)


def test_metric_names_exact_and_detached():
    policy = torch.randn(4, 3, requires_grad=True)
    loss, metrics = mdpo_loss(policy, torch.randn(4, 3))
    assert tuple(metrics) == METRIC_NAMES
    assert set(METRIC_NAMES) == {
        "rewards/chosen", "rewards/rejected", "rewards/imageless_chosen", "rewards/accuracies",
        "rewards/imageless_accuracies", "rewards/margins", "rewards/imageless_margins",
        "logps/chosen", "logps/rejected", "logps/imageless_chosen",
    }
    assert loss.dim() == 0 and loss.requires_grad
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())


def test_no_gradient_into_reference():
    ref = torch.randn(3, 3, requires_grad=True)
    loss, _ = mdpo_loss(torch.randn(3, 3, requires_grad=True), ref)
    loss.backward()
    assert ref.grad is None


def test_plain_dpo_weights():
    policy, ref = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    loss, _ = mdpo_loss(policy, ref, weights=(1, 0, 0))
    r = 0.1 * (policy - ref)
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(r[:, 0] - r[:, 1]).mean())


@pytest.mark.parametrize(
    ("policy", "ref", "kwargs", "match"),
    [
        (torch.zeros(2, 2), torch.zeros(2, 2), {}, r"policy_logps must be a \[B, 3\]"),
        (torch.zeros(2, 3), torch.zeros(3, 3), {}, "differ in shape"),
        (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), {}, "floating point"),
        (torch.zeros(0, 3), torch.zeros(0, 3), {}, "no examples"),
        (torch.zeros(2, 3), torch.zeros(2, 3), {"beta": 0.0}, "beta must be > 0"),
        (torch.zeros(2, 3), torch.zeros(2, 3), {"weights": (1, 1)}, "weights must be three"),
    ],
    ids=["not-3-columns", "shape-mismatch", "integer", "empty", "beta-zero", "two-weights"],
)
def test_bad_arguments(policy, ref, kwargs, match):
    with pytest.raises(ValueError, match=match):
        mdpo_loss(policy, ref, **kwargs)
