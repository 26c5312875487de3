"""`MDPOLoss`: the fused loss as an `nn.Module`, for dropping into another trainer."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mdpo_fast.ops.fused_loss import fused_linear_mdpo_loss


class MDPOLoss(nn.Module):
    """`loss, metrics = MDPOLoss(beta=0.1)(hidden, lm_head.weight, labels, segment_ids, ref_logps)`.

    See `fused_linear_mdpo_loss` for the arguments; keyword arguments of `forward` pass through.
    """

    def __init__(self, beta: float = 0.1, anchor: float = 0.0, weights: Sequence[float] = (1.0, 1.0, 1.0),
                 ignore_index: int = -100, deterministic: bool | None = None):
        super().__init__()
        self.beta, self.anchor, self.weights, self.ignore_index = beta, anchor, tuple(weights), ignore_index
        self.deterministic = deterministic

    def forward(self, hidden, weight, labels, segment_ids, ref_logps=None, **kwargs):
        return fused_linear_mdpo_loss(
            hidden, weight, labels, segment_ids, ref_logps, beta=self.beta, anchor=self.anchor,
            weights=self.weights, ignore_index=self.ignore_index, deterministic=self.deterministic, **kwargs,
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, anchor={self.anchor}, weights={self.weights}"
