"""LLaVA-1.5: CLIP tower, MLP projector, Llama decoder; a fixed number of image tokens, causal attention."""

from __future__ import annotations

from mdpo_fast.families.base import Family, register
from mdpo_fast.tiny import CHAT_TEMPLATE, build_tokenizer


@register
class Llava(Family):
    model_types = ("llava",)

    def tiny_processor(self, image_size: int = 32, patch_size: int = 8):
        from transformers import CLIPImageProcessorPil, LlavaProcessor

        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        )
        return LlavaProcessor(
            image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=patch_size,
            vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
        )

    def tiny_config(self, processor, text: dict):
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        image_size = processor.image_processor.crop_size["height"]
        vision = CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=image_size, patch_size=processor.patch_size, projection_dim=32,
        )
        return LlavaConfig(
            vision_config=vision, text_config=LlamaConfig(**text), image_token_id=processor.image_token_id,
            vision_feature_select_strategy="default", vision_feature_layer=-1,
            projector_hidden_act="gelu", tie_word_embeddings=False,
        )
