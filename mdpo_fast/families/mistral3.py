"""Mistral 3 (`mistral3`): Pixtral vision tower at each image's own size -> 2x2 patch merger -> Mistral decoder.

An image of h x w pixels (resized to a multiple of patch_size * spatial_merge_size) becomes h' rows of w' `[IMG]`
tokens, each row closed by `[IMG_BREAK]` and the last by `[IMG_END]`; the model reads the real sizes from
`image_sizes`. The decoder is causal with 1-D positions and no token types.

`transformers.PixtralProcessor` needs torchvision (a `requires` guard, and its module imports the torchvision
image processor at import time), so `tiny_processor` only works where torchvision is installed.
"""

from __future__ import annotations

from mdpo_fast.families.base import Family, register
from mdpo_fast.tiny import build_tokenizer

# Mistral's instruction format; the processor expands each [IMG] to the image's token grid.
CHAT_TEMPLATE = (
    "<s>{% for message in messages %}{% if message['role'] == 'user' %}[INST]"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}[IMG]"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}[/INST]"
    "{% else %}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{{ c['text'] }}{% endfor %}{% endif %}</s>"
    "{% endif %}{% endfor %}"
)
# Vision patches of PATCH px merged MERGE x MERGE: one [IMG] per 8 px. Longest edge 32 px keeps images at
# 4 x 4 tokens at most: 32x32 -> 4 rows of 4 (20 tokens with breaks), 64x32 -> 2 x 4 (10), 32x64 -> 4 x 2 (12),
# 64x16 -> 1 x 4 (5).
PATCH, MERGE, LONGEST_EDGE = 4, 2, 32


@register
class Mistral3Family(Family):
    model_types = ("mistral3",)

    def tiny_processor(self):
        from transformers import PixtralImageProcessorPil, PixtralProcessor

        tokenizer = build_tokenizer({"image_token": "[IMG]"}, extra=("[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]"))
        # As in the hub checkpoints, the image processor's patch is the vision tower's; the processor rounds
        # sizes to whole merged patches (patch_size * spatial_merge_size) itself.
        image_processor = PixtralImageProcessorPil(size={"longest_edge": LONGEST_EDGE}, patch_size=PATCH)
        return PixtralProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                                spatial_merge_size=MERGE, chat_template=CHAT_TEMPLATE)

    def tiny_config(self, processor, text: dict):
        from transformers import Mistral3Config

        vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, head_dim=16, patch_size=processor.patch_size,
                      image_size=processor.image_processor.size["longest_edge"])
        text = dict(text, model_type="mistral", head_dim=text["hidden_size"] // text["num_attention_heads"],
                    sliding_window=None)  # as in the hub checkpoints: full attention in every layer
        return Mistral3Config(vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
                              spatial_merge_size=processor.spatial_merge_size, vision_feature_layer=-1,
                              tie_word_embeddings=False)
