"""A model's processor, also where its video processor cannot be built.

Qwen2-VL-family processors insist on a video processor, and transformers' video processors need
torchvision. Preference training only reads images, so without torchvision the same processor class
is built from its image processor and tokenizer alone (saved checkpoints still name the real class).
"""

from __future__ import annotations

import functools
import json


@functools.cache
def image_only(cls: type) -> type:
    """`cls` (a processor class taking `image_processor, tokenizer, video_processor`) without the video one."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})


def load_processor(path: str):
    """`AutoProcessor.from_pretrained(path)`, or the image-only processor where the video processor needs
    torchvision."""
    import transformers
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(path)
    except OSError as e:
        if "video processor" not in str(e):
            raise
        name = _processor_class_name(path)
        if name is None or not hasattr(transformers, name):
            raise
    tokenizer = AutoTokenizer.from_pretrained(path)
    return image_only(getattr(transformers, name))(
        image_processor=AutoImageProcessor.from_pretrained(path), tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )


def _processor_class_name(path: str) -> str | None:
    from transformers.utils import cached_file

    for file in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        resolved = cached_file(path, file, _raise_exceptions_for_missing_entries=False)
        if resolved:
            with open(resolved) as f:
                name = json.load(f).get("processor_class")
            if name:
                return name
    return None
