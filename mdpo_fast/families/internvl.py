"""InternVL 3 (`InternVLForConditionalGeneration`): GotOcr2 tiles -> InternViT -> pixel shuffle -> MLP -> Qwen2.

Plain causal attention and 1-D positions, so the LLaVA-like defaults hold: the processor returns only input_ids,
attention_mask and pixel_values (all tiles of the batch stacked on dim 0, in image order).
"""

from __future__ import annotations

from mdpo_fast.families.base import Family, register
from mdpo_fast.tiny import chatml_template

# ChatML, as InternVL 3 checkpoints use; the processor expands each <IMG_CONTEXT> to <img> + tokens + </img>.
_TEMPLATE = chatml_template("<IMG_CONTEXT>\n")

_TILE = 24  # pixels per tile side
_PATCH = 6  # vision patch side: (24 / 6)^2 = 16 patches per tile
_RATIO = 0.5  # pixel shuffle keeps 16 * 0.5^2 = 4 tokens per tile


@register
class InternVL(Family):
    model_types = ("internvl",)

    def tiny_processor(self):
        from transformers import GotOcr2ImageProcessorPil, InternVLProcessor

        from mdpo_fast.processors import image_only
        from mdpo_fast.tiny import build_tokenizer

        tokenizer = build_tokenizer(
            {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"},
            ("<|im_start|>", "<|im_end|>"),
        )
        # 24 px tiles, at most 4 + thumbnail: 32x32 -> 1 tile, 64x32 / 32x64 -> 2 + 1, 48x40 -> 4 + 1
        image_processor = GotOcr2ImageProcessorPil(
            size={"height": _TILE, "width": _TILE}, crop_to_patches=True, min_patches=1, max_patches=4,
        )
        # No video processor (it needs torchvision); image_seq_length must equal the features per tile.
        return image_only(InternVLProcessor)(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=_TEMPLATE,
            image_seq_length=int((_TILE // _PATCH) ** 2 * _RATIO**2),
        )

    def tiny_config(self, processor, text: dict):
        from transformers import InternVLConfig

        vision = dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=processor.image_processor.size["height"], patch_size=_PATCH,
        )
        return InternVLConfig(
            vision_config=vision, text_config={"model_type": "qwen2", **text},
            image_token_id=processor.image_token_id, image_seq_length=processor.image_seq_length,
            downsample_ratio=_RATIO, vision_feature_select_strategy="default", vision_feature_layer=-1,
            tie_word_embeddings=False,
        )
