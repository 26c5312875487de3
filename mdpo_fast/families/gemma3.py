"""Gemma 3 (vision-language): `Gemma3ForConditionalGeneration`, SigLIP tower, Gemma 3 decoder.

Each image becomes `\\n\\n<start_of_image>` + a fixed number of soft tokens + `<end_of_image>\\n\\n`; the processor
marks the soft tokens (not boi/eoi) with `token_type_ids == 1`, and the model lets each maximal run of them attend
both ways. Decoder layers mix `sliding_attention` and `full_attention`; the model composes them as
full = causal OR same-image, sliding = (kv > q - sliding_window) AND (causal OR same-image): the window also bounds
how far back an image token sees its own image, while looking forward within the image is never cut.
"""

from __future__ import annotations

import torch

from mdpo_fast.families.base import Family, register

# The layout of the released checkpoints' chat template, reduced to one image + text user turns.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<start_of_image>{% elif c['type'] == 'text' %}{{ c['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def image_runs(is_image: torch.Tensor) -> torch.Tensor:
    """`[R, L]` bool -> group id of each maximal run of True (numbered from 0 per row), -1 elsewhere."""
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
    return torch.where(is_image, starts.long().cumsum(1) - 1, -1)


@register
class Gemma3(Family):
    model_types = ("gemma3",)
    window_limits_groups = True

    def text_inputs(self, input_ids, answer_mask, config):
        # What the processor returns (its `mm_token_type_ids`, renamed): 1 on image soft tokens, 0 elsewhere.
        return {"token_type_ids": (input_ids == config.image_token_id).long()}

    def bidirectional_groups(self, input_ids, answer_mask, config):
        return image_runs(input_ids == config.image_token_id)

    def tiny_processor(self):
        from transformers import Gemma3ImageProcessorPil, Gemma3Processor

        from mdpo_fast.tiny import build_tokenizer

        tokenizer = build_tokenizer(
            {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
            extra=("<start_of_turn>", "<end_of_turn>"),
        )
        # Pan-and-scan stays off as in the released checkpoints: the processor's own default (False) overrides the
        # image processor's setting, so turning it on there alone would desync token counts from pixel values.
        # Every image is resized to 32x32 -> 8x8 patches -> pooled to 16 soft tokens, whatever its size.
        image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
        return Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=16,
                               chat_template=CHAT_TEMPLATE)

    def tiny_init(self, model, std: float = 0.2):
        # the model zero-initialises its image projection whatever the config: a random model ignores images
        with torch.no_grad():
            torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=std)

    def tiny_config(self, processor, text):
        from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

        tok = processor.tokenizer
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        # A window (8) shorter than an image (16 soft tokens) and than any prompt, so tests see both layer types
        # and the window cutting into an image block. initializer_range 0.2 (default 0.02) makes the effects of
        # token types and images on answer log-probs several times larger.
        text_config = Gemma3TextConfig(
            **text, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"], initializer_range=0.2,
        )
        image_size = processor.image_processor.size["height"]
        vision = SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=image_size, patch_size=image_size // 8, vision_use_head=False,
        )
        return Gemma3Config(
            text_config=text_config, vision_config=vision, mm_tokens_per_image=processor.image_seq_length,
            image_token_index=tok.image_token_id, boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
            initializer_range=0.2, tie_word_embeddings=False,
        )
