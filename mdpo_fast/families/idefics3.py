"""Idefics3 (and SmolVLM v1 checkpoints, which are `idefics3`): SigLIP crops -> pixel shuffle -> Llama decoder.

Each image becomes a grid of crops plus a downsized global image; the prompt carries
`<fake_token_around_image><row_i_col_j><image>*n` per crop and `<fake_token_around_image><global-img><image>*n
<fake_token_around_image>` for the global one. The decoder is a plain causal Llama with 1-D positions and no
token types, so nothing beyond the defaults is needed for the text side.
"""

from __future__ import annotations

from mdpo_fast.families.base import Family, register
from mdpo_fast.tiny import build_tokenizer

# Idefics3-style turns ("User:<image>text<end_of_utterance>\nAssistant: answer<end_of_utterance>\n")
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
# Tile tags are added tokens in the hub tokenizers; the processors only write them as text.
TILE_TAGS = ("<global-img>", *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))
NAMED_TOKENS = {
    "image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>",
}
# Crops of CROP px, patches of PATCH px, pixel shuffle by SCALE: (CROP / PATCH / SCALE)^2 = 4 tokens per crop.
# Images are first resized to a longest edge of 3 crops, so the crop grid follows the aspect ratio:
# 32x32 -> 3x3 + global (10 crops), 64x32 -> 2 rows x 3 (7), 32x64 -> 3 rows x 2 (7), 64x16 -> 1 x 3 (4).
CROP, PATCH, SCALE = 16, 4, 2


@register
class Idefics3Family(Family):
    model_types = ("idefics3",)
    language_model = "text_model"

    def _image_processor(self):
        from transformers import Idefics3ImageProcessorPil

        return Idefics3ImageProcessorPil(size={"longest_edge": 3 * CROP}, max_image_size={"longest_edge": CROP})

    def tiny_processor(self):
        from transformers import Idefics3Processor

        tokenizer = build_tokenizer(NAMED_TOKENS, extra=("<|im_start|>", *TILE_TAGS))
        return Idefics3Processor(image_processor=self._image_processor(), tokenizer=tokenizer,
                                 image_seq_len=(CROP // PATCH // SCALE) ** 2, chat_template=CHAT_TEMPLATE)

    def tiny_config(self, processor, text: dict):
        from transformers import Idefics3Config

        return Idefics3Config(**self._config_kwargs(processor, text))

    def _config_kwargs(self, processor, text: dict) -> dict:
        crop = processor.image_processor.max_image_size["longest_edge"]
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=crop, patch_size=PATCH)
        return dict(vision_config=vision, text_config=dict(text, model_type="llama"), scale_factor=SCALE,
                    image_token_id=processor.image_token_id, pad_token_id=text["pad_token_id"],
                    tie_word_embeddings=False)
