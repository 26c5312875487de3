"""The rows that carry a label: the only ones any backend spends work on."""

from __future__ import annotations

import torch


def valid_rows(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """`[M]` int64 indices of the rows that have a label (one host sync); only these cost work."""
    return (labels != ignore_index).nonzero().squeeze(1)
