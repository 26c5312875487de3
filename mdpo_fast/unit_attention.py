"""Packed rows attended unit by unit: one SDPA call per unit over its own tokens, so the entries of a dense row mask
that lie between units (most of a long row's) are neither built nor computed. The CPU path of packed SDPA.

The decoder receives, per layer kind, a placeholder mask of the row shape (no memory) and `unit_layout`, which holds
each unit's span and its own mask (None where plain causal attention is exact). The registered attention function
runs the units; called without the layout (another layout, the vision tower) it is transformers' SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "mdpo_fast_unit_sdpa"


class Span(NamedTuple):
    """A unit's tokens: columns `start` to `end` of packed row `row`."""

    row: int
    start: int
    end: int


@dataclass
class UnitLayout:
    """`spans`: every unit's `Span`, padding runs included, tiling each row in order. `masks`: per placeholder (by
    identity), one `[1, 1, U, U]` bool mask per span, or None for plain causal attention. `placeholders` holds the
    placeholders themselves, so no id in `masks` is reused while the layout lives."""

    rows: int
    length: int
    spans: list[Span]
    masks: dict[int, list[torch.Tensor | None]] = field(default_factory=dict)
    placeholders: list[torch.Tensor] = field(default_factory=list)

    def placeholder(self, masks: list[torch.Tensor | None], device) -> torch.Tensor:
        """A `[R, 1, L, L]` stand-in for a dense mask (an expanded scalar) standing for `masks`."""
        stand_in = torch.zeros((), dtype=torch.bool, device=device).expand(self.rows, 1, self.length, self.length)
        self.placeholders.append(stand_in)
        self.masks[id(stand_in)] = masks
        return stand_in


def unit_spans(units: list[list[int]]) -> list[Span]:
    """The `Span` of each run of equal unit ids in `units` (rows of a packed batch's `unit_ids`), with the
    padding at a row's end (negative ids, one per token) as one run."""
    spans = []
    for r, ids in enumerate(units):
        start = 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or (ids[i] != ids[start] and not (ids[i] < 0 and ids[start] < 0)):
                spans.append(Span(r, start, i))
                start = i
    return spans


def unit_sdpa(module, query, key, value, attention_mask, unit_layout: UnitLayout | None = None, **kwargs):
    if unit_layout is None:
        if getattr(attention_mask, "stride", lambda: None)() == (0, 0, 0, 0):
            raise RuntimeError("a packed batch's placeholder mask reached attention without its unit layout: this "
                               "model does not pass keyword arguments down to attention; use --attn_implementation "
                               "eager or flex_attention")
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    masks = unit_layout.masks.get(id(attention_mask))
    if masks is None:
        raise RuntimeError("unit attention received a mask that is not its layout's placeholder")
    sizes = [span.end - span.start for span in unit_layout.spans]

    def units(x):  # [R, heads, L, d] -> one [1, heads, U, d] per unit; split's backward is one cat
        return x.transpose(0, 1).reshape(1, x.shape[1], -1, x.shape[3]).split(sizes, dim=2)

    outputs = [sdpa_attention_forward(module, q, k, v, mask, **kwargs)[0]  # [1, U, heads, d]
               for q, k, v, mask in zip(units(query), units(key), units(value), masks, strict=True)]
    out = torch.cat(outputs, dim=1)
    return out.view(unit_layout.rows, unit_layout.length, *out.shape[2:]), None


AttentionInterface.register(NAME, unit_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)
