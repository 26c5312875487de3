"""What every backend's launchers share: the rows that carry a label (the only ones any backend spends work on),
and what a forward launch returns."""

from __future__ import annotations

from typing import NamedTuple

import torch


class RowLogprobs(NamedTuple):
    """A forward launch's `logps [N]` and log-sum-exps `lse [N]` (fp32; 0 on rows without a label): the backward
    recomputes the logits and takes the softmax from `lse`."""

    logps: torch.Tensor
    lse: torch.Tensor


def valid_rows(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """`[M]` int64 indices of the rows that have a label (one host sync); only these cost work."""
    return (labels != ignore_index).nonzero().squeeze(1)
