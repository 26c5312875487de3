"""PaliGemma 1 (Gemma decoder) and PaliGemma 2 (Gemma 2 decoder): SigLIP tower, one linear projector.

The processor's layout, with `suffix=answer`: `<image>` x N, `<bos>`, the prompt, `\\n` (the prefix, token type 0),
then the answer and `<eos>` (the suffix, token type 1, the only labelled tokens). The prefix attends both ways
as one block, the suffix causally. PaliGemma 2 also alternates sliding-window and full layers; there the model
ORs the prefix block onto the windowed causal mask, so the window never cuts the prefix:
full = causal OR both-in-prefix, sliding = (causal AND kv > q - sliding_window) OR both-in-prefix.
"""

from __future__ import annotations

import torch

from mdpo_fast.families.base import Family, register

# The checkpoints carry no chat template. The model's format is one turn: images first, then the prompt (the
# processor itself inserts `<bos>` after the last `<image>` and ends the prompt with `\n`), and the answer followed
# by `<eos>`, tokenized on its own as the processor tokenizes `suffix`.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.index0 > 0 %}{{ raise_exception('PaliGemma takes a single user turn') }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for c in message['content'] if c['type'] == 'image' %}<image>{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}"
    "{% endif %}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{% endif %}"
    "{{ eos_token }}"
    "{% else %}{{ raise_exception('PaliGemma has no ' + message['role'] + ' role') }}"
    "{% endif %}"
    "{% endfor %}"
)


@register
class PaliGemma(Family):
    model_types = ("paligemma",)
    chat_template = CHAT_TEMPLATE
    position_offset = 1  # the model's own positions count from 1
    tiny_text_model = "gemma"  # the decoder of the tiny model: "gemma" (PaliGemma 1) or "gemma2" (PaliGemma 2)

    def packing_refusal(self, config):
        if getattr(config.get_text_config(), "sliding_window", None):
            return ("PaliGemma 2's forward takes one attention mask for all layers, so a packed row cannot keep its "
                    "sliding-window layers")
        return None

    def plain_inputs(self, processor, prompt_text, answer_text, image):
        # the processor builds prefix and suffix itself: bos and newline around the prompt, eos after the answer
        eos = processor.tokenizer.eos_token
        suffix = answer_text[: -len(eos)] if answer_text.endswith(eos) else answer_text
        return processor(text=[prompt_text], images=[image], suffix=[suffix], return_tensors="pt")

    def text_inputs(self, input_ids, answer_mask, config):
        # The processor's token types: 0 on the prefix (image, bos, prompt, newline), 1 on the suffix (answer, eos).
        return {"token_type_ids": answer_mask.long()}

    def bidirectional_groups(self, input_ids, answer_mask, config):
        # One group per maximal run of non-answer tokens: each prompt of a row (several when packed). A trailing
        # run of padding becomes a group no real token belongs to.
        prefix = ~answer_mask
        starts = prefix & ~torch.nn.functional.pad(prefix, (1, 0))[:, :-1]
        return torch.where(prefix, starts.long().cumsum(1) - 1, -1)

    def tiny_processor(self):
        from transformers import PaliGemmaProcessor, SiglipImageProcessorPil

        from mdpo_fast.tiny import build_tokenizer

        # 32x32 -> 4x4 patches of 8 px -> 16 image tokens for every image (PaliGemma resizes, never tiles)
        image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
        image_processor.image_seq_length = 16
        # The processor adds the 1024 <locNNNN> and 128 <segNNN> tokens to the tokenizer, as the checkpoints have.
        return PaliGemmaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(),
                                  chat_template=CHAT_TEMPLATE)

    def tiny_config(self, processor, text):
        from transformers import PaliGemmaConfig

        head_dim = text["hidden_size"] // text["num_attention_heads"]
        # initializer_range 0.2 (default 0.02): PaliGemma 1's token types and image then move answer log-probs by
        # ~3.5 instead of ~0.02.
        text = {"model_type": self.tiny_text_model, **text, "head_dim": head_dim, "initializer_range": 0.2}
        if text["model_type"] == "gemma2":
            # A window (8) shorter than the prefix (16 image tokens + prompt), so tests see that it does not cut it.
            text.update(sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                        query_pre_attn_scalar=head_dim)
        image_size = processor.image_processor.size["height"]
        vision = dict(
            model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, image_size=image_size, patch_size=image_size // 4, vision_use_head=False,
        )
        return PaliGemmaConfig(
            text_config=text, vision_config=vision, image_token_index=processor.image_token_id,
            projection_dim=text["hidden_size"], hidden_size=text["hidden_size"], vocab_size=text["vocab_size"],
            initializer_range=0.2, tie_word_embeddings=False,
        )


@register
class PaliGemma2(PaliGemma):
    """The same family; registered under a name of its own only so `mdpo-fast tiny-model DIR paligemma2` builds a
    PaliGemma 2 (whose checkpoints say model type `paligemma`)."""

    model_types = ("paligemma2",)
    tiny_text_model = "gemma2"
    tiny_attn_implementation = "eager"  # Gemma 2 has no sdpa path
