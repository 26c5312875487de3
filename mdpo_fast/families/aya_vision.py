"""Aya Vision (`AyaVisionForConditionalGeneration`): GotOcr2 tiles -> SigLIP -> pixel shuffle + SwiGLU -> Cohere2.

Cohere2 interleaves sliding-window layers (RoPE) with full-attention layers that use no positions at all (NoPE);
attention is causal everywhere, so no token types and no bidirectional blocks.
"""

from __future__ import annotations

from mdpo_fast.families.base import Family, register

# Cohere's turn format, as in the Aya Vision checkpoints; the processor expands each <image>.
_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|START_OF_TURN_TOKEN|>"
    "{% if message['role'] == 'user' %}<|USER_TOKEN|>{% elif message['role'] == 'assistant' %}<|CHATBOT_TOKEN|>"
    "{% else %}<|SYSTEM_TOKEN|>{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|END_OF_TURN_TOKEN|>{% endfor %}"
    "{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>{% endif %}"
)

_TILE = 24  # pixels per tile side
_PATCH = 6  # SigLIP patch side: 4 x 4 patches per tile
_DOWNSAMPLE = 2  # pixel shuffle: 2 x 2 = 4 tokens per tile


@register
class AyaVision(Family):
    model_types = ("aya_vision",)

    def tiny_processor(self):
        from transformers import AyaVisionProcessor, GotOcr2ImageProcessorPil

        from mdpo_fast.tiny import build_tokenizer

        image_tokens = ("<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>",
                        "TILE", "TILE_GLOBAL")
        chat = ("<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>",
                "<|SYSTEM_TOKEN|>")
        tokenizer = build_tokenizer(extra=image_tokens + chat)
        # 24 px tiles, at most 4 + the global one: 32x32 -> 1 tile, 64x32 / 32x64 -> 2 + 1, 48x40 -> 4 + 1
        image_processor = GotOcr2ImageProcessorPil(
            size={"height": _TILE, "width": _TILE}, crop_to_patches=True, min_patches=1, max_patches=4,
        )
        # tokens per tile = (img_size // (patch_size * downsample_factor))^2 must match the model's pixel shuffle
        return AyaVisionProcessor(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=_TEMPLATE,
            patch_size=_PATCH, downsample_factor=_DOWNSAMPLE, img_size=_TILE,
        )

    def tiny_config(self, processor, text: dict):
        from transformers import AyaVisionConfig

        vision = dict(
            model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, image_size=processor.img_size, patch_size=_PATCH, vision_use_head=False,
        )
        # a window smaller than one sequence, so the sliding layer differs from the full (NoPE) one
        text = {"model_type": "cohere2", **text, "sliding_window": 16,
                "layer_types": ["sliding_attention", "full_attention"]}
        return AyaVisionConfig(
            vision_config=vision, text_config=text, image_token_id=processor.image_token_id,
            downsample_factor=_DOWNSAMPLE, vision_feature_select_strategy="full", vision_feature_layer=-1,
            tie_word_embeddings=False,
        )
