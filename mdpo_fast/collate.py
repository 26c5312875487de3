"""Layer 3 (plain path): the three branches of a batch as right-padded rows, branch-major.

Rows `0..B-1` are chosen `(m, x, y_w)`, `B..2B-1` rejected `(m, x, y_l)`, `2B..3B-1` corrupted
`(m', x, y_w)` (left out when the run does not need that branch). This simple layout is what the packed
layout is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mdpo_fast.ops.loss import CORRUPTED, NUM_BRANCHES, REJECTED

IGNORE_INDEX = -100


@dataclass(frozen=True)
class BatchStats:
    """What a batch puts through the model, for the logs: token positions (real and padding) and images through
    the vision tower. Plain ints, so reading them never waits for the device."""

    tokens: int
    padding: int
    images: int


def image_inputs(batch: dict) -> dict:
    """The batch's image inputs for the model (pixel_values, image_grid_thw, ...): its `images` entry, which only
    the collators fill, so no other batch entry ever reaches the model as an image argument."""
    return batch.get("images", {})


def concat_image_inputs(image_inputs: list[dict]) -> dict:
    """Concatenate per-image processor outputs (pixel_values, image_sizes, image_grid_thw, ...) in the given
    order, zero-padding every dimension but the first to the largest, as processors pad a batch (tile counts
    and image sizes differ per image; the model reads the real ones from image_sizes or its masks)."""
    batch = {}
    for key in image_inputs[0]:
        parts = [torch.as_tensor(x[key]) for x in image_inputs]
        shape = [max(sizes) for sizes in zip(*(p.shape[1:] for p in parts), strict=True)]
        batch[key] = torch.cat([_pad_to(p, shape) for p in parts])
    return batch


def _pad_to(x: torch.Tensor, shape: list[int]) -> torch.Tensor:
    if list(x.shape[1:]) == shape:
        return x
    out = x.new_zeros((x.shape[0], *shape))
    out[(slice(None), *(slice(0, n) for n in x.shape[1:]))] = x
    return out


def pad_rows(rows: list[tuple], images: list[dict], pad_token_id: int, family=None, config=None) -> dict:
    """`(prompt_ids, answer_ids)` rows right-padded to one width: input_ids, attention_mask, labels (answer
    tokens at their own positions, shifted where log-probs are taken), the rows' image inputs (`images`) and the
    per-token inputs the model's `family` adapter asks for (token types), under `text_inputs`."""
    width = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for r, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        input_ids[r, :n] = torch.tensor(prompt + answer)
        attention_mask[r, :n] = 1
        labels[r, len(prompt):n] = torch.tensor(answer)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
             "images": concat_image_inputs(images)}
    if family is not None:
        batch["text_inputs"] = family.text_inputs(input_ids, labels != IGNORE_INDEX, config)
    return batch


class PaddedCollator:
    """`family`, `config`: the model's family adapter and config, for its per-token inputs (none if None).
    `num_branches`: 2 leaves the corrupted-image rows out (`loss.num_branches`)."""

    def __init__(self, pad_token_id: int, family=None, config=None, num_branches: int = NUM_BRANCHES):
        self.pad_token_id = pad_token_id
        self.family, self.config = family, config
        self.num_branches = num_branches

    def __call__(self, items: list[dict]) -> dict:
        rows, images = [], []
        for branch in range(self.num_branches):
            for item in items:
                ex = item["example"]
                rows.append((ex.prompt_ids, ex.rejected_ids if branch == REJECTED else ex.chosen_ids))
                images.append(item["corrupted_image" if branch == CORRUPTED else "image"])
        batch = pad_rows(rows, images, self.pad_token_id, self.family, self.config)
        mask = batch["attention_mask"]
        batch["example_index"] = torch.tensor([item["example"].index for item in items])
        batch["stats"] = BatchStats(int(mask.sum()), int((mask == 0).sum()), len(images))
        if "ref_logps" in items[0]:
            batch["ref_logps"] = torch.stack([item["ref_logps"] for item in items])
        return batch
