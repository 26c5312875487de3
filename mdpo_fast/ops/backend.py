"""Backend choice (docs/DESIGN.md, "Backends"): `MDPO_FAST_BACKEND=auto|triton|torch`; auto = Triton for CUDA tensors.

Each backend offers the same two launchers for log-probs from hidden states, so the autograd
Functions above them exist once:
    fwd(hidden, weight, labels, bias, *, rows, softcap) -> rows.RowLogprobs (logps [N] fp32, lse [N] fp32)
    bwd(grad_logps, hidden, weight, labels, lse, bias, *, rows, need_hidden, need_weight, need_bias, softcap,
        deterministic) -> grads
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from mdpo_fast.ops.chunked import chunked_logprobs_bwd, chunked_logprobs_fwd

CHOICES = ("auto", "triton", "torch")


class LinearOps(NamedTuple):
    name: str
    fwd: object
    bwd: object


TORCH_OPS = LinearOps("torch", chunked_logprobs_fwd, chunked_logprobs_bwd)


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_for(device: torch.device) -> str:
    """`"triton"` or `"torch"` for tensors on `device`, as `MDPO_FAST_BACKEND` asks."""
    choice = os.environ.get("MDPO_FAST_BACKEND", "auto").lower()
    if choice not in CHOICES:
        raise ValueError(f"MDPO_FAST_BACKEND must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if device.type != "cuda" and not _triton_interpreting():
            raise ValueError(
                f"MDPO_FAST_BACKEND=triton needs CUDA tensors (got {device}) or TRITON_INTERPRET=1 set before "
                "triton is imported"
            )
        return "triton"
    return "triton" if device.type == "cuda" else "torch"


def linear_ops(device: torch.device) -> LinearOps:
    if backend_for(device) == "torch":
        return TORCH_OPS
    from mdpo_fast.ops.kernels.linear_logprobs import linear_logprobs_bwd, linear_logprobs_fwd

    return LinearOps("triton", linear_logprobs_fwd, linear_logprobs_bwd)
