"""The mDPO objective (docs/DESIGN.md, "The objective, exactly") on summed answer log-probs of the three branches."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Branch columns, in this order everywhere.
CHOSEN, REJECTED, CORRUPTED = 0, 1, 2
NUM_BRANCHES = 3
BRANCH_NAMES = ("chosen", "rejected", "corrupted")

# Names as in mDPO's own training logs ("imageless" = the corrupted-image branch).
METRIC_NAMES = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/imageless_chosen",
    "rewards/accuracies",
    "rewards/imageless_accuracies",
    "rewards/margins",
    "rewards/imageless_margins",
    "logps/chosen",
    "logps/rejected",
    "logps/imageless_chosen",
)


IMAGELESS_METRICS = tuple(name for name in METRIC_NAMES if "imageless" in name)


def logged_metrics(metrics: dict, num_branches: int) -> list[tuple[str, object]]:
    """`(name, value)` of the metrics a run with `num_branches` branches reports: the imageless ones only where the
    corrupted-image branch was built (never made-up zeros)."""
    return [(name, metrics[name]) for name in METRIC_NAMES
            if num_branches == NUM_BRANCHES or name not in IMAGELESS_METRICS]


def num_branches(weights: Sequence[float], imageless_metrics: bool) -> int:
    """How many branches, in order, a run builds: the corrupted-image branch (the last) only when the conditional
    term has a weight or its metrics are asked for; plain DPO builds chosen and rejected alone."""
    return NUM_BRANCHES if weights[1] > 0 or imageless_metrics else NUM_BRANCHES - 1


def check_loss_options(beta: float, weights: Sequence[float]) -> tuple[float, float, float]:
    """`weights` as three floats, after refusing a non-positive `beta` or weights that are not three non-negative
    numbers."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    weights = tuple(float(w) for w in weights)
    if len(weights) != 3 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be three non-negative numbers (dpo, cond, anchor), got {weights}")
    return weights


def _check_logps(name: str, logps: torch.Tensor) -> None:
    if not isinstance(logps, torch.Tensor) or logps.dim() != 2 or logps.shape[1] != NUM_BRANCHES:
        shape = tuple(logps.shape) if isinstance(logps, torch.Tensor) else type(logps).__name__
        raise ValueError(f"{name} must be a [B, 3] tensor (chosen, rejected, corrupted), got {shape}")
    if not logps.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {logps.dtype}")
    if logps.shape[0] == 0:
        raise ValueError(f"{name} has no examples (B = 0)")


def mdpo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    anchor: float = 0.0,
    weights: Sequence[float] = (1.0, 1.0, 1.0),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """mDPO loss from summed answer log-probs.

    Args:
        policy_logps: `[B, 3]` policy sequence log-probs, columns (chosen, rejected, corrupted).
        ref_logps: `[B, 3]` reference sequence log-probs, same layout; no gradient flows into it.
        beta: reward scale, `r = beta * (policy - reference)`.
        anchor: the reward the chosen answer is anchored above.
        weights: `(w_dpo, w_cond, w_anc)`; `(1, 0, 0)` is plain DPO.

    Returns:
        `(loss, metrics)`: a 0-d loss (mean over examples), and detached 0-d batch means keyed by
        `METRIC_NAMES`.

    Example:
        >>> loss, metrics = mdpo_loss(torch.zeros(2, 3), torch.zeros(2, 3))
        >>> round(loss.item(), 4)  # 3 * log(2)
        2.0794
    """
    _check_logps("policy_logps", policy_logps)
    _check_logps("ref_logps", ref_logps)
    if policy_logps.shape != ref_logps.shape:
        raise ValueError(
            f"policy_logps {tuple(policy_logps.shape)} and ref_logps {tuple(ref_logps.shape)} differ in shape"
        )
    return mdpo_objective(policy_logps, ref_logps, beta, anchor, check_loss_options(beta, weights))


def mdpo_objective(policy_logps, ref_logps, beta: float, anchor: float, weights: tuple[float, float, float]):
    """`mdpo_loss` on arguments its caller has checked (the fused loss checks its own once, at its entry)."""
    w_dpo, w_cond, w_anc = weights
    dtype = torch.promote_types(policy_logps.dtype, torch.float32)  # fp64 stays fp64
    rewards = beta * (policy_logps.to(dtype) - ref_logps.detach().to(policy_logps.device, dtype))
    chosen, rejected, corrupted = rewards.unbind(dim=1)
    per_example = (
        -w_dpo * F.logsigmoid(chosen - rejected)
        - w_cond * F.logsigmoid(chosen - corrupted)
        - w_anc * F.logsigmoid(chosen - anchor)
    )
    return per_example.mean(), reward_metrics(rewards.detach(), policy_logps.detach())


def reward_metrics(rewards: torch.Tensor, policy_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """The metrics of docs/DESIGN.md ("The objective, exactly") from `[B, 3]` rewards and policy log-probs, as 0-d
    tensors (no host sync), keyed by `METRIC_NAMES` in that order."""
    chosen, rejected, corrupted = rewards.unbind(dim=1)
    logps = policy_logps.to(rewards.dtype).mean(dim=0)
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/imageless_chosen": corrupted.mean(),
        "rewards/accuracies": (chosen > rejected).to(rewards.dtype).mean(),
        "rewards/imageless_accuracies": (chosen > corrupted).to(rewards.dtype).mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/imageless_margins": (chosen - corrupted).mean(),
        "logps/chosen": logps[CHOSEN],
        "logps/rejected": logps[REJECTED],
        "logps/imageless_chosen": logps[CORRUPTED],
    }
