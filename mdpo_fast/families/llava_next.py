"""LLaVA-NeXT (1.6): anyres tiling (a resized base image + crops at the best grid pinpoint), CLIP tower, MLP
projector, an `image_newline` embedding after each row of the unpadded crop grid; Llama/Mistral decoder.

Plain causal attention and 1-D positions, so the LLaVA-like defaults hold. The processor returns pixel_values
`[1, tiles, C, H, W]` per image and image_sizes `[1, 2]` (original H, W); a batch zero-pads the tile axis to
its largest count, and the model drops the padding tiles exactly (it recounts each image's tiles from
image_sizes and the config's image_grid_pinpoints before running the tower).
"""

from __future__ import annotations

from mdpo_fast.families.base import Family, register

# Mistral-style turns, as llava-v1.6-mistral checkpoints use (hub checkpoints ship their own template).
_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %} [/INST]"
    "{% else %} "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{{ c['text'] }}{% endfor %}{% endif %}</s>"
    "{% endif %}{% endfor %}"
)

TILE = 16  # pixels per tile side (the tower's image_size)
PATCH = 8  # tower patch side: 2 x 2 features per tile
# (height, width) grids of 16 px tiles. Images (w x h) 32x32 -> 2x2 crops + base = 5 tiles (24 tokens),
# 64x32 -> 2x4 + 1 = 9 (40), 32x64 -> 2x1 + 1 = 3 (16), 48x40 -> 2x3 + 1 = 7 (24 after unpadding).
PINPOINTS = [[32, 16], [32, 32], [32, 48], [32, 64]]


@register
class LlavaNext(Family):
    model_types = ("llava_next",)

    def tiny_processor(self):
        from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

        from mdpo_fast.tiny import build_tokenizer

        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS,
        )
        # patch_size and the CLS count must match the tower: the processor counts image tokens from them.
        return LlavaNextProcessor(
            image_processor=image_processor, tokenizer=build_tokenizer(extra=("[INST]", "[/INST]")),
            patch_size=PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1,
            chat_template=_TEMPLATE,
        )

    def tiny_config(self, processor, text: dict):
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

        vision = CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=processor.image_processor.crop_size["height"], patch_size=processor.patch_size,
            projection_dim=32,
        )
        return LlavaNextConfig(
            vision_config=vision, text_config=LlamaConfig(**text), image_token_id=processor.image_token_id,
            image_grid_pinpoints=processor.image_processor.image_grid_pinpoints,
            vision_feature_select_strategy=processor.vision_feature_select_strategy, vision_feature_layer=-1,
            projector_hidden_act="gelu", tie_word_embeddings=False,
        )
