"""Llama 4: refused before any weight loads (see `refusal`)."""

from __future__ import annotations

from mdpo_fast.families.base import Family, register


@register
class Llama4(Family):
    model_types = ("llama4",)
    refusal = ("not supported yet: no layout of it has been checked against its own forward (its image processor "
               "needs torchvision), and its NoPE layers scale queries by a token's index in the row, which packing "
               "would change")
