"""LLaVA-OneVision: anyres tiling as LLaVA-NeXT (base image + crops, `image_newline` after each feature row,
features bilinearly shrunk past `vision_aspect_ratio` = "anyres_max_N" crops' worth), SigLIP tower (no CLS),
Qwen2 decoder.

Plain causal attention and 1-D positions, so the LLaVA-like defaults hold. The processor returns pixel_values
`[1, tiles, C, H, W]`, image_sizes `[1, 2]` and batch_num_images `[1]` per image; a batch zero-pads the tile
axis and the model drops the padding tiles exactly. batch_num_images must stay one per image (a sample with
several images is encoded base-image-only, which the processor's token count would not match).
"""

from __future__ import annotations

from mdpo_fast.families.base import Family, register
from mdpo_fast.tiny import chatml_template

# ChatML, as the Qwen2-based hub checkpoints use (they ship their own template).
_TEMPLATE = chatml_template("<image>\n")

TILE = 16  # pixels per tile side (the tower's image_size)
PATCH = 8  # tower patch side: 2 x 2 features per tile
# (height, width) grids of 16 px tiles: 32x32 -> 5 tiles, 64x32 -> 9, 32x64 -> 3, 48x40 -> 7 (w x h).
PINPOINTS = [[32, 16], [32, 32], [32, 48], [32, 64]]
# Image tokens 24, 25, 16, 24. At most 5 crops' worth of features before shrinking, so the 8-crop image (64x32)
# takes the shrinking path: 4 + 3x6 + 3 newlines = 25 tokens instead of 4 + 4x8 + 4 = 40.
ASPECT = "anyres_max_5"


@register
class LlavaOnevision(Family):
    model_types = ("llava_onevision",)

    def tiny_processor(self):
        from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

        from mdpo_fast.processors import image_only
        from mdpo_fast.tiny import build_tokenizer

        tokenizer = build_tokenizer({"video_token": "<video>"}, ("<|im_start|>", "<|im_end|>"))
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS,
        )
        # No video processor (it needs torchvision). The processor counts image tokens from num_image_tokens
        # (features per tile), vision_feature_select_strategy and vision_aspect_ratio: all must match the model.
        return image_only(LlavaOnevisionProcessor)(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=_TEMPLATE,
            num_image_tokens=(TILE // PATCH) ** 2, vision_feature_select_strategy="full", vision_aspect_ratio=ASPECT,
        )

    def tiny_config(self, processor, text: dict):
        from transformers import LlavaOnevisionConfig, SiglipVisionConfig

        side = processor.image_processor.size["height"]
        vision = SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=side, patch_size=side // int(processor.num_image_tokens**0.5), vision_use_head=False,
        )
        return LlavaOnevisionConfig(
            vision_config=vision, text_config={"model_type": "qwen2", **text},
            image_token_id=processor.image_token_id, video_token_id=processor.video_token_id,
            image_grid_pinpoints=processor.image_processor.image_grid_pinpoints,
            vision_aspect_ratio=processor.vision_aspect_ratio,
            vision_feature_select_strategy=processor.vision_feature_select_strategy, vision_feature_layer=-1,
            tie_word_embeddings=False,
        )
