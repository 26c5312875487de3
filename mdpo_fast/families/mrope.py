"""3-D rotary positions (M-RoPE) of prompts of the Qwen2-VL, Qwen2.5-VL, Qwen3-VL and GLM-4V families, built
on the CPU by the collator; each family's tests check them against the model's own `get_rope_index`.

Text advances the temporal, height and width axes together by one per token. An image block of
`t x h x w` merged patches starting at position `s` takes `(s + i, s + row, s + column)`, and the
text after it resumes at `s + max(h, w)`. Packing needs this per unit, since a row holds many prompts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RopePositions(NamedTuple):
    """Multi-axis positions of one prompt: `positions [axes, len(prompt)]`, and `next`, where the answers that
    follow it continue (`next + j` on every axis)."""

    positions: torch.Tensor
    next: int


def mrope_positions(ids, image_token_id: int, grids, merge_size: int) -> RopePositions:
    """The `RopePositions` of one prompt (3 axes). `grids`: `image_grid_thw` rows of its images, in order."""
    is_image = torch.as_tensor(ids) == image_token_id
    edges = (torch.nonzero(is_image[1:] != is_image[:-1]).flatten() + 1).tolist()
    bounds = [0, *edges, len(ids)]
    grids = iter(grids)
    parts, start = [], 0
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if not is_image[lo]:
            parts.append(torch.arange(start, start + hi - lo).expand(3, -1))
            start += hi - lo
            continue
        while lo < hi:  # adjacent images share one run of image tokens
            grid = next(grids, None)
            if grid is None:
                raise ValueError(f"image tokens at {lo} have no image_grid_thw row left")
            t, h, w = int(grid[0]), int(grid[1]) // merge_size, int(grid[2]) // merge_size
            if lo + t * h * w > hi:
                raise ValueError(f"image grid {t}x{h}x{w} is larger than its {hi - lo} image tokens")
            axes = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            parts.append(torch.stack(axes).reshape(3, -1) + start)
            start += max(h, w)
            lo += t * h * w
    if next(grids, None) is not None:
        raise ValueError("more image_grid_thw rows than images in the prompt")
    return RopePositions(torch.cat(parts, dim=1), start)
