"""SmolVLM2 (`smolvlm`): the Idefics3 architecture (crops + global image, pixel shuffle, causal Llama decoder).

`SmolVLMProcessor` cannot be built here: its constructor needs `num2words` (for video prompts) and its
`apply_chat_template` reads `video_processor.num_frames`, a video processor that needs torchvision. For images
it writes exactly Idefics3's prompt (same tile tags, same `<fake_token_around_image>` / `<global-img>` layout)
from an image processor with Idefics3's splitting, so the tiny processor is `Idefics3Processor` over
SmolVLM's own PIL image processor.
"""

from __future__ import annotations

from mdpo_fast.families.base import register
from mdpo_fast.families.idefics3 import CROP, Idefics3Family


@register
class SmolVLMFamily(Idefics3Family):
    model_types = ("smolvlm",)
    processor_substitute = "Idefics3Processor"  # hub checkpoints name SmolVLMProcessor: see above

    def _image_processor(self):
        from transformers import SmolVLMImageProcessorPil

        return SmolVLMImageProcessorPil(size={"longest_edge": 3 * CROP}, max_image_size={"longest_edge": CROP})

    def tiny_config(self, processor, text: dict):
        from transformers import SmolVLMConfig

        return SmolVLMConfig(**self._config_kwargs(processor, text))
