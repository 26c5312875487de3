"""Tiny random-weight models of every family with a tiny builder, with their processors, built in code.
Family modules build their processors from `build_tokenizer`; this module imports them only when called.

Tests, the demo and the CPU benchmarks all use this one builder. The tokenizer is byte-level BPE
(any text round-trips) with whole-word merges for the demo vocabulary, so demo answers stay short.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Words that get a single token; everything else falls back to bytes.
WORDS = (
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


def chatml_template(image: str) -> str:
    """A ChatML chat template (`<|im_start|>role ... <|im_end|>`, as Qwen, InternVL and LLaVA-OneVision checkpoints
    use) that renders each image of a user turn as `image`."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for c in message['content'] %}"
        "{% if c['type'] == 'image' %}" + image + "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def build_tokenizer(special_tokens: dict[str, str] | None = None, extra: tuple[str, ...] = ()):
    """Byte-level BPE tokenizer with `<pad>`, `<s>`, `</s>`, `<image>` special tokens. `special_tokens`: named
    special tokens a family's processor reads (`{"image_token": "<image_soft_token>", "boi_token": ...}`);
    `extra`: further special tokens (chat markers, tile tags)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    named = {"image_token": "<image>", **(special_tokens or {})}
    specials = list(dict.fromkeys(["<pad>", "<s>", "</s>", *named.values(), *extra]))
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = []
    # Space-prefixed forms rank first, so " is" merges into one token before "is" could.
    forms = [" " + w for w in WORDS] + [" " + w.capitalize() for w in WORDS]
    for form in forms + WORDS + [w.capitalize() for w in WORDS]:
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
    tok.add_special_tokens(specials)  # never split, whatever the merges
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens=named, model_max_length=4096,
    )


def tiny_families() -> tuple[str, ...]:
    """Model types with a tiny builder (`mdpo-fast tiny-model DIR TYPE`)."""
    from mdpo_fast.families.base import Family, registered

    return tuple(t for t, fam in registered().items() if type(fam).tiny_config is not Family.tiny_config)


def _family(model_type: str):
    from mdpo_fast.families.base import registered

    if model_type not in tiny_families():
        raise ValueError(f"no tiny model of {model_type!r}: expected one of {', '.join(tiny_families())}")
    return registered()[model_type]


def build_processor(family: str = "llava"):
    """The family's processor with the tiny byte-level tokenizer, built in code."""
    return _family(family).tiny_processor()


def build_tiny_model(processor=None, *, family: str = "llava", hidden_size: int = 128, num_layers: int = 2,
                     seed: int = 0):
    """Random-weight model of the family `family` (a model type) with its processor: a tiny vision tower and a
    `num_layers` decoder of width `hidden_size`. Returns (model, processor)."""
    processor = processor or build_processor(family)
    tok = processor.tokenizer
    text = dict(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )
    adapter = _family(family)
    config = adapter.tiny_config(processor, text)
    torch.manual_seed(seed)
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_config(config, attn_implementation=adapter.tiny_attn_implementation)
    model.eval()
    adapter.tiny_init(model)
    return model, processor


def write_tiny_model(directory: str | Path, seed: int = 0, family: str = "llava") -> Path:
    """Save the tiny model and its processor to `directory`, loadable by `mdpo-fast train`."""
    directory = Path(directory)
    model, processor = build_tiny_model(family=family, seed=seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
