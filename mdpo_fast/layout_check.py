"""The run-time guard against plausible-looking wrong numbers: on the first batch, the log-probs our layout
gives must equal the model's own plain forward of the same sequences, as its processor builds them."""

from __future__ import annotations

import logging

import torch

from mdpo_fast.ops.loss import BRANCH_NAMES

logger = logging.getLogger("mdpo_fast")

# Largest mean per-token difference (nats) between the layout and the plain forward: numerical noise at the
# compute dtype, far below what a wrong mask, position or token type moves. Averaged over at least MIN_TOKENS
# tokens: on a short answer the rounding of one half-precision logit alone can reach the per-token figure.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}
MIN_TOKENS = 8


class LayoutMismatchError(RuntimeError):
    """The layout in use does not reproduce the model's own forward; training on it would be silently wrong."""


def plain_logps(model, processor, family, prompt_text: str, answer_text: str, prompt_ids, answer_ids,
                image, *, where: str) -> torch.Tensor:
    """Summed log-probs of `answer_ids` after `prompt_ids`, from the model's forward of the whole sequence as the
    processor builds it from the texts and the image (its own token types, pixel values, sizes, grids)."""
    inputs = family.plain_inputs(processor, prompt_text, answer_text, image)
    inputs.pop("labels", None)  # log-probs are taken here, not the model's loss
    ids = inputs["input_ids"][0].tolist()
    p, a = len(prompt_ids), len(answer_ids)
    if ids[:p] != list(prompt_ids) or ids[p:p + a] != list(answer_ids):
        raise LayoutMismatchError(
            f"{where}: the processor tokenizes the whole sequence differently from the prompt and the answer "
            "apart, so training would score other tokens than the model reads")
    device = next(model.parameters()).device
    shape = inputs["input_ids"].shape
    # per-token inputs cut to the answer as (possibly) truncated for training
    inputs = {k: (v[:, :p + a] if v.shape == shape else v).to(device) if isinstance(v, torch.Tensor) else v
              for k, v in inputs.items()}
    # logits of the answer positions only: a [tokens, vocab] tensor of the whole sequence is never made
    logits = model(**inputs, logits_to_keep=torch.arange(p - 1, p + a - 1), use_cache=False).logits
    logps = torch.log_softmax(logits[0].float(), dim=-1)
    return logps.gather(-1, torch.tensor(answer_ids, device=logps.device)[:, None]).sum()


def check_layout(model, processor, family, dataset, example_rows: list[int], layout_logps: torch.Tensor,
                 layout: str, dtype: torch.dtype, num_branches: int) -> None:
    """Compare `layout_logps [B, 3]` (the batch of dataset rows `example_rows`, from the layout in use) with the
    plain forward of the first two examples, each branch built (the first `num_branches`); raise
    `LayoutMismatchError` beyond tolerance.
    `dtype`: what the forwards compute in (the hidden states' dtype; under autocast not the weights').
    Call under the reference context (no grad, eval)."""
    tolerance = TOLERANCE.get(dtype, 5e-2)
    for b, row in enumerate(example_rows[:2]):
        ex = dataset.examples[row]
        image, corrupted = dataset.images(row)
        branches = [(image, ex.chosen_text, ex.chosen_ids), (image, ex.rejected_text, ex.rejected_ids),
                    (corrupted, ex.chosen_text, ex.chosen_ids)]  # in the loss's order (loss.CHOSEN, ...)
        for branch, (img, text, ids) in enumerate(branches[:num_branches]):
            where = f"record {ex.index}, {BRANCH_NAMES[branch]} branch"
            want = plain_logps(model, processor, family, ex.prompt_text, text, ex.prompt_ids, ids, img, where=where)
            got = layout_logps[b, branch].float()
            per_token = (got - want.to(got.device)).abs().item() / max(len(ids), MIN_TOKENS)
            if not per_token <= tolerance:
                raise LayoutMismatchError(
                    f"{where}: the {layout} layout gives log-prob {got.item():.6f}, the model's own forward "
                    f"{want.item():.6f} ({per_token:.2e} per token, tolerance {tolerance:.0e} in {dtype}); refusing "
                    "to train on wrong numbers. Try --packing false, and please report the model type")
    logger.info("layout check: the %s layout matches the model's own forward on %d examples", layout,
                min(2, len(example_rows)))
