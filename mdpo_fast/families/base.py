"""What a vision-language family tells the generic layers, and the registry that finds it by `model_type`.

A family is one small subclass of `Family` in its own module of this package. The defaults describe a
LLaVA-like model: 1-D positions, causal attention, the decoder under a `language_model` module, and
the model's own forward handling its image inputs (pixel values, sizes, grids, tiles).
"""

from __future__ import annotations

import torch

from mdpo_fast.families.mrope import RopePositions

_REGISTRY: dict[str, Family] = {}


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: make `cls` the family of each of its `model_types`."""
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls()
    return cls


class Family:
    # `config.model_type` values this adapter serves
    model_types: tuple[str, ...] = ()
    # name of the module that holds the decoder (LoRA targets; trains with the LM head)
    language_model: str = "language_model"
    # why this family cannot train here at all (checked before any weight loads); None when it can
    refusal: str | None = None
    # the family's documented prompt format, for checkpoints whose processor has no chat template
    chat_template: str | None = None
    # first 1-D position of a sequence (PaliGemma counts from 1)
    position_offset: int = 0
    # sliding-window layers: True if the window also bounds the bidirectional groups (Gemma 3:
    # window AND (causal OR group)); False if groups see each other whatever the window (PaliGemma 2:
    # (causal AND window) OR group)
    window_limits_groups: bool = False
    # a processor class that builds the same inputs, for checkpoints whose own class cannot be built here
    processor_substitute: str | None = None
    # attention the tiny model is built with (sdpa, or eager where the decoder has no sdpa path)
    tiny_attn_implementation: str = "sdpa"

    def packing_refusal(self, config) -> str | None:
        """Why the packed layout cannot be exact for this model; None when it can."""
        return None

    def image_inputs(self, processor, image, image_prompt: str) -> dict:
        """The model's inputs for one image (pixel values, sizes, grids, tiles), as the processor makes them: through
        the processor itself with `image_prompt` (a user turn holding just the image, `image_prompt(processor)`),
        so its own image settings apply (tiling, size rounding), then without the per-token text inputs."""
        out = processor(text=[image_prompt], images=[image], return_tensors="pt")
        per_token = out["input_ids"].shape
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor) and v.shape != per_token}

    def text_inputs(self, input_ids: torch.Tensor, answer_mask: torch.Tensor, config) -> dict[str, torch.Tensor]:
        """Per-token forward inputs beside `input_ids` (`[R, L]`), such as token types. `answer_mask`: `[R, L]`
        bool, True on answer tokens (the processor's "suffix")."""
        return {}

    def bidirectional_groups(self, input_ids: torch.Tensor, answer_mask: torch.Tensor, config) -> torch.Tensor | None:
        """`[R, L]` long, or None for causal attention only: tokens of one sequence with the same group >= 0
        also attend to each other regardless of order (an image's tokens, a prefix); -1 elsewhere."""
        return None

    def plain_inputs(self, processor, prompt_text: str, answer_text: str, image) -> dict:
        """The processor's inputs for the whole sequence prompt + answer, as a user of the model would build them."""
        return processor(text=[prompt_text + answer_text], images=[image], return_tensors="pt")

    def rope_positions(self, prompt_ids, image_inputs: dict, config) -> RopePositions | None:
        """Multi-axis (M-RoPE) positions of one prompt (`families.mrope.RopePositions`); None for 1-D positions."""
        return None

    def tiny_processor(self):
        """The family's processor, built in code (no download), with a byte-level tokenizer."""
        raise NotImplementedError

    def tiny_config(self, processor, text: dict):
        """A tiny random-weight model config of the family; `text`: the decoder's sizes and token ids."""
        raise NotImplementedError

    def tiny_init(self, model) -> None:
        """Weights the family's own init leaves inert in a random model (a zero projection), drawn at random."""


def image_prompt(processor) -> str:
    """A user turn holding one image and nothing else, in the processor's chat template."""
    return processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=False)


def registered() -> dict[str, Family]:
    """Every registered family by model type."""
    from mdpo_fast import families  # noqa: F401  (imports every family module, filling the registry)

    return dict(_REGISTRY)


def family_for(config) -> Family:
    """The adapter of `config.model_type`; the generic (LLaVA-like) one for a type no module registers."""
    from mdpo_fast import families  # noqa: F401  (imports every family module, filling the registry)

    return _REGISTRY.get(config.model_type, _GENERIC)


_GENERIC = Family()


def trainable_family(config) -> Family:
    """`family_for(config)`, or a ValueError saying why this model cannot train here (its family's `refusal`)."""
    family = family_for(config)
    if family.refusal:
        raise ValueError(f"{config.model_type} models cannot train here: {family.refusal}")
    return family


def packed_layout_refusal(config) -> str | None:
    """Why the packed layout cannot be trusted for this model (the padded layout serves it), or None."""
    if config.model_type not in registered():
        return f"no family adapter knows {config.model_type!r} models, so the packed layout is not known to be exact"
    return family_for(config).packing_refusal(config)


def image_token_id(config) -> int:
    """The id of the image placeholder token, under either name configs use."""
    value = getattr(config, "image_token_id", None)
    return value if value is not None else config.image_token_index
