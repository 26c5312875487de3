"""Tiny models of each supported family (LLaVA, Qwen2-VL, Qwen2.5-VL) with processors, built in code.

Tests, the demo and the CPU benchmarks all use this one builder. The tokenizer is byte-level BPE
(any text round-trips) with whole-word merges for the demo vocabulary, so demo answers stay short.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mdpo_fast.processors import image_only

FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl")

# Words that get a single token; everything else falls back to bytes.
_WORDS = (
    "a an the and is are in at of on to with there image picture shape shapes what which where "
    "describe show shows see colour color red green blue yellow purple orange white black circle "
    "square triangle top bottom left right centre center corner middle upper lower one two it "
    "this that you do"
).split()

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{{ c['text'] }}{% endfor %}{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer():
    """Byte-level BPE tokenizer with `<pad>`, `<s>`, `</s>`, `<image>` special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    specials = ["<pad>", "<s>", "</s>", "<image>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = []
    # Space-prefixed forms rank first, so " is" merges into one token before "is" could.
    forms = [" " + w for w in _WORDS] + [" " + w.capitalize() for w in _WORDS]
    for form in forms + _WORDS + [w.capitalize() for w in _WORDS]:
            (piece, _), = byte_level.pre_tokenize_str(form)
            left = piece[0]
            for ch in piece[1:]:
                if left + ch not in vocab:
                    merges.append((left, ch))
                    vocab[left + ch] = len(vocab)
                left = left + ch
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"}, model_max_length=4096,
    )


def build_processor(family: str = "llava", image_size: int = 32, patch_size: int = 8):
    """The tiny tokenizer and chat template with the family's image processor. Qwen2-VL-family images keep
    their aspect ratio and take 4 to 16 image tokens (dynamic resolution)."""
    from transformers import (
        CLIPImageProcessorPil,
        LlavaProcessor,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessorPil,
        Qwen2VLProcessor,
    )

    if family == "llava":
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        )
        return LlavaProcessor(
            image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=patch_size,
            vision_feature_select_strategy="default", num_additional_image_tokens=1,
            chat_template=CHAT_TEMPLATE,
        )
    cls = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor}.get(family)
    if cls is None:
        raise ValueError(f"family {family!r}: expected one of {', '.join(FAMILIES)}")
    image_processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=112 * 112)
    return image_only(cls)(image_processor=image_processor, tokenizer=build_tokenizer(), chat_template=CHAT_TEMPLATE)


def build_tiny_model(processor=None, *, family: str = "llava", hidden_size: int = 128, num_layers: int = 2,
                     seed: int = 0):
    """Random-weight model of `family` with its processor: LLaVA (CLIP tower -> MLP projector -> Llama),
    Qwen2-VL or Qwen2.5-VL (their own towers and mergers, M-RoPE decoder). Returns (model, processor)."""
    processor = processor or build_processor(family)
    tok = processor.tokenizer
    text = dict(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )
    if family == "llava":
        config = _llava_config(processor, text)
    else:
        config = _qwen_config(family, processor, text)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_config(config).eval()
    return model, processor


def _llava_config(processor, text: dict):
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


def _qwen_config(family: str, processor, text: dict):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    head_half = text["hidden_size"] // text["num_attention_heads"] // 2
    # temporal, height, width shares of the rotary frequencies, in the proportions of Qwen's (16, 24, 24)
    section = [head_half - 2 * (3 * head_half // 8), 3 * head_half // 8, 3 * head_half // 8]
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
    vision = dict(depth=2, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_vl":
        vision.update(embed_dim=32, mlp_ratio=2, hidden_size=text["hidden_size"])
        cls = Qwen2VLConfig
    else:  # windowed attention in the first block, full in the second
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=text["hidden_size"], window_size=56,
                      fullatt_block_indexes=[1])
        cls = Qwen2_5_VLConfig
    return cls(text_config=text, vision_config=vision, image_token_id=processor.image_token_id,
               tie_word_embeddings=False)


def write_tiny_model(directory: str | Path, seed: int = 0, family: str = "llava") -> Path:
    """Save the tiny model and its processor to `directory`, loadable by `mdpo-fast train`."""
    directory = Path(directory)
    model, processor = build_tiny_model(family=family, seed=seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
