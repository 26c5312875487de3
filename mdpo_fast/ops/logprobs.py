"""Public per-token log-prob functions, with argument checks that name what is wrong."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mdpo_fast.ops.backend import LinearOps, backend_for, linear_ops
from mdpo_fast.ops.naive import token_logprobs_naive
from mdpo_fast.ops.rows import valid_rows


@dataclass(frozen=True)
class LogprobOptions:
    ops: LinearOps
    ignore_index: int = -100
    softcap: float | None = None
    deterministic: bool | None = None


def deterministic_backward(choice: bool | None) -> bool:
    """An explicit choice, else whether PyTorch runs deterministic algorithms (`torch.use_deterministic_algorithms`,
    which `--full_determinism` sets), read when the backward runs."""
    return torch.are_deterministic_algorithms_enabled() if choice is None else choice


class LinearLogprobs(torch.autograd.Function):
    """Log-probs from hidden states through either backend's launchers (`backend.linear_ops`)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts: LogprobOptions):
        rows = valid_rows(labels, opts.ignore_index)
        logps, lse = opts.ops.fwd(hidden, weight, labels, bias, rows=rows, softcap=opts.softcap)
        ctx.save_for_backward(hidden, weight, bias, labels, rows, lse)
        ctx.opts = opts
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, bias, labels, rows, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grads = ctx.opts.ops.bwd(
            grad_logps, hidden, weight, labels, lse, bias, rows=rows,
            need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias, softcap=ctx.opts.softcap,
            deterministic=deterministic_backward(ctx.opts.deterministic),
        )
        return *grads, None, None


def _check_labels(labels, n: int, vocab_size: int, ignore_index: int, check_range: bool = True) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(f"labels must be a 1-D integer tensor, got {_describe(labels)}")
    if labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} entries but the inputs have {n} rows")
    if not check_range:
        return
    valid = labels[labels != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= vocab_size):
        raise ValueError(
            f"labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
            f"got values in [{int(valid.min())}, {int(valid.max())}]"
        )


def check_linear_inputs(hidden, weight, labels, ignore_index: int, bias=None, softcap=None,
                        check_range: bool = True) -> None:
    """ValueError naming the argument, for anything `linear_token_logprobs` cannot take; the labels' range (read on
    the host: device syncs) unless `check_range` is false."""
    if softcap is not None and not (isinstance(softcap, int | float) and softcap > 0):
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    _check_matrix("hidden", hidden)
    _check_matrix("weight", weight)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, {hidden.shape[1]}] to match hidden, got {tuple(weight.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"bias must be a [{weight.shape[0]}] tensor, got {_describe(bias)}")
    _check_labels(labels, hidden.shape[0], weight.shape[0], ignore_index, check_range)
    for name, x in (("weight", weight), ("labels", labels), ("bias", bias)):
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but hidden is on {hidden.device}")


def _check_matrix(name: str, x) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{name} must be a 2-D floating-point tensor, got {_describe(x)}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return type(x).__name__


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-token `log softmax(logits)[label]` in fp32, 0 where `labels == ignore_index`.

    Args:
        logits: `[N, V]` floating point.
        labels: `[N]` integer token ids.

    Returns:
        `[N]` float32.
    """
    _check_matrix("logits", logits)
    _check_labels(labels, logits.shape[0], logits.shape[1], ignore_index)
    if labels.device != logits.device:
        raise ValueError(f"labels is on {labels.device} but logits is on {logits.device}")
    if backend_for(logits.device) == "triton":
        from mdpo_fast.ops.kernels.logits_logprobs import triton_token_logprobs

        return triton_token_logprobs(logits, labels, ignore_index)
    return token_logprobs_naive(logits, labels, ignore_index).float()


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    deterministic: bool | None = None,
    check_ranges: bool = True,
) -> torch.Tensor:
    """Per-token log-probs of `labels` under `hidden @ weight.T (+ bias)`, never holding `[N, V]` logits.

    Args:
        hidden: `[N, H]` last hidden states of the tokens that predict `labels` (packed: all sequences
            back to back).
        weight: `[V, H]` LM-head weight. Cast to `hidden.dtype` for the matmul; logits in fp32.
        labels: `[N]` next-token ids, `ignore_index` where no log-prob is wanted (costs no work).
        bias: optional `[V]` LM-head bias.
        softcap: logits become `softcap * tanh(logits / softcap)` before the softmax, as models with final
            logit soft-capping (Gemma 2, `final_logit_softcapping`) compute them; None for none.
        deterministic: a backward whose results are bitwise equal from run to run (the Triton kernels then use no
            float atomics, at the cost of recomputing the logits once more); None follows
            `torch.are_deterministic_algorithms_enabled()`. The PyTorch path is deterministic either way.
        check_ranges: read the labels' range on the host to refuse ids outside the vocabulary (device syncs on
            GPU); a caller whose labels are right by construction may skip it.

    Returns:
        `[N]` float32 log-probs, 0 where ignored; differentiable in `hidden`, `weight` and `bias`.

    Example:
        >>> h, w = torch.randn(5, 8), torch.randn(11, 8)
        >>> linear_token_logprobs(h, w, torch.tensor([1, 2, -100, 4, 0])).shape
        torch.Size([5])
    """
    check_linear_inputs(hidden, weight, labels, ignore_index, bias, softcap, check_ranges)
    opts = LogprobOptions(linear_ops(hidden.device), ignore_index, softcap, deterministic)
    return LinearLogprobs.apply(hidden, weight, bias, labels, opts)


def segment_logps(token_logps: torch.Tensor, segment_ids: torch.Tensor, num_examples: int) -> torch.Tensor:
    """Sum per-token log-probs into `[B, 3]` by `segment_ids = 3 * example + branch` (-1: no segment)."""
    keep = segment_ids >= 0
    sums = token_logps.new_zeros(num_examples * 3).index_add(0, segment_ids[keep], token_logps[keep])
    return sums.view(num_examples, 3)
