"""A model's processor, also where its video processor cannot be built.

Qwen2-VL-family processors insist on a video processor, and transformers' video processors need
torchvision. Preference training only reads images, so without torchvision the same processor class
is built from its image processor, tokenizer and chat template alone. What it saves still loads as the
full processor where torchvision is installed.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path


@functools.cache
def image_only(cls: type) -> type:
    """`cls` (a processor class taking `image_processor, tokenizer, video_processor`) without the video one."""

    @classmethod
    def get_attributes(cls_):
        # what the processor saves and loads: every attribute but the video processor, settings unchanged
        return [a for a in cls.get_attributes() if a != "video_processor"]

    def save_pretrained(self, save_directory, *args, **kwargs):
        out = cls.save_pretrained(self, save_directory, *args, **kwargs)
        # With no video entry in processor_config.json, AutoProcessor reads the image and video processors'
        # settings from here, as in the hub checkpoints.
        self.image_processor.to_json_file(os.path.join(save_directory, "preprocessor_config.json"))
        return out

    def __reduce__(self):  # pickled (to preparation workers) as the base class and its state, rebuilt here
        return _rebuild_image_only, (cls, self.__dict__)

    return type(cls.__name__, (cls,), {"get_attributes": get_attributes, "save_pretrained": save_pretrained,
                                       "__reduce__": __reduce__,
                                       "__module__": cls.__module__})


def _rebuild_image_only(cls: type, state: dict):
    processor = image_only(cls).__new__(image_only(cls))
    processor.__dict__.update(state)
    return processor


def processor_home(checkpoint: str, base: str) -> str:
    """Where a run's processor is: the checkpoint, which saves it, else (a checkpoint without one) the base model."""
    saved = any((Path(checkpoint) / name).is_file() for name in ("processor_config.json", "preprocessor_config.json"))
    return str(checkpoint) if saved else base


def load_processor(path: str, family=None):
    """`AutoProcessor.from_pretrained(path)`; without torchvision, the image-only processor when the model's
    processor needs a video processor; where the processor class cannot be built here at all, the `family`'s
    `processor_substitute` (a class that builds the same image inputs and prompts), if it names one."""
    import transformers
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    try:
        name = None if is_torchvision_available() else _processor_class_name(path)
        cls = getattr(transformers, name, None) if name else None
        if cls is not None and "video_processor" in cls.get_attributes():
            return image_only(cls).from_pretrained(path)
        return AutoProcessor.from_pretrained(path)
    except (ImportError, TypeError):  # TypeError: a class that will not be built without its video processor
        if family is None or family.processor_substitute is None:
            raise
        return getattr(transformers, family.processor_substitute).from_pretrained(path)


def _processor_class_name(path: str) -> str | None:
    from transformers.utils import cached_file

    for file in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        resolved = cached_file(path, file, _raise_exceptions_for_missing_entries=False)
        if resolved:
            with open(resolved, encoding="utf-8") as f:
                name = json.load(f).get("processor_class")
            if name:
                return name
    return None
