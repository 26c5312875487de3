"""Qwen3-VL: Qwen2-VL's dynamic resolution and 3-D M-RoPE (its `get_rope_index` gives images the same positions
as `families.mrope`), plus DeepStack: features of some vision blocks are added to the image tokens' hidden states
after the first decoder layers. Those ride in `get_image_features(...)` output (`deepstack_features`) next to
`pooler_output`, so precomputed `mm_encoder_outputs={"image": ...}` carry them; attention stays plain causal."""

from __future__ import annotations

from mdpo_fast.families.base import Family, register
from mdpo_fast.families.mrope import mrope_positions
from mdpo_fast.tiny import build_tokenizer, chatml_template

# ChatML, as Qwen3-VL checkpoints render it (minus system prompt and tools)
CHAT_TEMPLATE = chatml_template("<|vision_start|><|image_pad|><|vision_end|>")


@register
class Qwen3VL(Family):
    model_types = ("qwen3_vl",)

    def text_inputs(self, input_ids, answer_mask, config):
        # as ProcessorMixin.create_mm_token_type_ids: 1 on image tokens, 2 on video tokens; without them (and
        # without position_ids) the forward refuses image inputs
        types = (input_ids == config.image_token_id).long()
        return {"mm_token_type_ids": types + 2 * (input_ids == config.video_token_id).long()}

    def rope_positions(self, prompt_ids, image_inputs, config):
        return mrope_positions(prompt_ids, config.image_token_id, image_inputs["image_grid_thw"],
                               config.vision_config.spatial_merge_size)

    def tiny_processor(self):
        from transformers import Qwen2VLImageProcessorPil, Qwen3VLProcessor

        from mdpo_fast.processors import image_only

        tokenizer = build_tokenizer(
            {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
             "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
            extra=("<|im_start|>", "<|im_end|>"),
        )
        # Qwen3-VL's patch 16 and mean/std 0.5; aspect ratio kept, 4 to 16 image tokens per image
        image_processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                                   min_pixels=64 * 64, max_pixels=128 * 128,
                                                   image_mean=[0.5] * 3, image_std=[0.5] * 3)
        return image_only(Qwen3VLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                            chat_template=CHAT_TEMPLATE)

    def tiny_config(self, processor, text: dict):
        from transformers import Qwen3VLConfig

        head_dim = text["hidden_size"] // text["num_attention_heads"]
        half = head_dim // 2
        # interleaved temporal, height, width frequencies in the proportions of Qwen3-VL's (24, 20, 20)
        section = [half - 2 * (5 * half // 16), 5 * half // 16, 5 * half // 16]
        text = {**text, "head_dim": head_dim, "rope_parameters": {
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": section, "mrope_interleaved": True}}
        # two DeepStack features (from both vision blocks) go to decoder layers 0 and 1
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=text["hidden_size"],
                      num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
        return Qwen3VLConfig(
            text_config=text, vision_config=vision, image_token_id=processor.image_token_id,
            video_token_id=processor.video_token_id, vision_start_token_id=processor.vision_start_token_id,
            vision_end_token_id=processor.vision_end_token_id, tie_word_embeddings=False,
        )
