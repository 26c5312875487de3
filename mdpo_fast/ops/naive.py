"""Plain full-logits PyTorch references: simple and exact. The references tests and benchmarks compare with, and
`token_logprobs`' own CPU path (callers that already hold the logits)."""

from __future__ import annotations

import torch


def token_logprobs_naive(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """`log softmax(logits)[label]` per row, 0 where ignored; fp32, or fp64 for fp64 input. `[N, V], [N] -> [N]`."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp = torch.log_softmax(logits, dim=-1).gather(1, safe[:, None]).squeeze(1)
    return torch.where(valid, logp, 0.0)


def linear_token_logprobs_naive(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, bias=None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The same from hidden states: `[N, V]` logits in the input dtype, soft-capped as the model does it
    (`softcap * tanh(logits / softcap)`, Gemma 2), then fp32 log-softmax."""
    logits = hidden @ weight.to(hidden.dtype).T
    if bias is not None:
        logits = logits + bias.to(hidden.dtype)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return token_logprobs_naive(logits, labels, ignore_index)

