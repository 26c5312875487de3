"""Qwen2-VL and Qwen2.5-VL: dynamic resolution (a grid of merged patches per image) and 3-D M-RoPE positions,
which the model derives from `mm_token_type_ids` in a plain forward and the packed layout builds per unit."""

from __future__ import annotations

from mdpo_fast.families.base import Family, register
from mdpo_fast.families.mrope import mrope_positions
from mdpo_fast.tiny import CHAT_TEMPLATE, build_tokenizer


@register
class Qwen2VL(Family):
    model_types = ("qwen2_vl",)

    def text_inputs(self, input_ids, answer_mask, config):
        return {"mm_token_type_ids": (input_ids == config.image_token_id).long()}

    def rope_positions(self, prompt_ids, image_inputs, config):
        return mrope_positions(prompt_ids, config.image_token_id, image_inputs["image_grid_thw"],
                               config.vision_config.spatial_merge_size)

    def tiny_processor(self):
        from transformers import Qwen2VLProcessor

        return _tiny_processor(Qwen2VLProcessor)

    def tiny_config(self, processor, text: dict):
        from transformers import Qwen2VLConfig

        vision = dict(embed_dim=32, mlp_ratio=2, hidden_size=text["hidden_size"])
        return _tiny_config(Qwen2VLConfig, processor, text, vision)


@register
class Qwen25VL(Qwen2VL):
    model_types = ("qwen2_5_vl",)

    def tiny_config(self, processor, text: dict):
        from transformers import Qwen2_5_VLConfig

        # windowed attention in the first block, full in the second
        vision = dict(hidden_size=32, intermediate_size=64, out_hidden_size=text["hidden_size"], window_size=56,
                      fullatt_block_indexes=[1])
        return _tiny_config(Qwen2_5_VLConfig, processor, text, vision)

    def tiny_processor(self):
        from transformers import Qwen2_5_VLProcessor

        return _tiny_processor(Qwen2_5_VLProcessor)


def _tiny_processor(cls):
    from transformers import Qwen2VLImageProcessorPil

    from mdpo_fast.processors import image_only

    # aspect ratio kept, 4 to 16 image tokens per image
    image_processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=112 * 112)
    return image_only(cls)(image_processor=image_processor, tokenizer=build_tokenizer(), chat_template=CHAT_TEMPLATE)


def _tiny_config(cls, processor, text: dict, vision: dict):
    head_half = text["hidden_size"] // text["num_attention_heads"] // 2
    # temporal, height, width shares of the rotary frequencies, in the proportions of Qwen's (16, 24, 24)
    section = [head_half - 2 * (3 * head_half // 8), 3 * head_half // 8, 3 * head_half // 8]
    text = {**text, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}}
    vision = dict(depth=2, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, **vision)
    return cls(text_config=text, vision_config=vision, image_token_id=processor.image_token_id,
               tie_word_embeddings=False)


