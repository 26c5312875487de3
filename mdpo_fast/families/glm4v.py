"""GLM-4.1V / GLM-4.5V-style `glm4v`: dynamic resolution like Qwen2-VL and 3-D M-RoPE whose `get_rope_index` gives
images the same positions as `families.mrope` (rotary on half of each head, the axes' frequencies in blocks).
Attention is plain causal. Video frames reuse the image token, told apart only by `mm_token_type_ids`."""

from __future__ import annotations

from mdpo_fast.families.base import Family, register
from mdpo_fast.families.mrope import mrope_positions
from mdpo_fast.tiny import build_tokenizer

# GLM-4.1V's turn format (without its thinking/answer tags)
CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@register
class Glm4V(Family):
    model_types = ("glm4v",)

    def text_inputs(self, input_ids, answer_mask, config):
        # as Glm4vProcessor.create_mm_token_type_ids: the image token is 2 between video start and end, else 1;
        # without them (and without position_ids) the forward refuses image inputs
        in_video = (input_ids == config.video_start_token_id).cumsum(-1) > (input_ids == config.video_end_token_id
                                                                            ).cumsum(-1)
        return {"mm_token_type_ids": (input_ids == config.image_token_id).long() * (1 + in_video.long())}

    def rope_positions(self, prompt_ids, image_inputs, config):
        return mrope_positions(prompt_ids, config.image_token_id, image_inputs["image_grid_thw"],
                               config.vision_config.spatial_merge_size)

    def tiny_processor(self):
        from transformers import Glm4vImageProcessorPil, Glm4vProcessor

        from mdpo_fast.processors import image_only

        tokenizer = build_tokenizer(
            {"image_token": "<|image|>", "video_token": "<|video|>"},
            extra=("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|begin_of_image|>",
                   "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>"),
        )
        # GLM's resize bounds count the 2 temporal copies of an image: 4 to 16 image tokens per image
        image_processor = Glm4vImageProcessorPil(
            patch_size=14, merge_size=2, temporal_patch_size=2,
            size={"shortest_edge": 2 * 56 * 56, "longest_edge": 2 * 112 * 112},
        )
        return image_only(Glm4vProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                          chat_template=CHAT_TEMPLATE)

    def tiny_config(self, processor, text: dict):
        from transformers import Glm4vConfig

        # GLM rotates half of each head; axes split that half's frequencies like GLM-4.1V's (8, 12, 12)
        half = text["hidden_size"] // text["num_attention_heads"] // 4
        section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
        text = {**text, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                            "partial_rotary_factor": 0.5, "mrope_section": section}}
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, image_size=56,
                      spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=text["hidden_size"])
        ids = processor.tokenizer.convert_tokens_to_ids
        return Glm4vConfig(
            text_config=text, vision_config=vision, image_token_id=processor.image_token_id,
            video_token_id=processor.video_token_id, image_start_token_id=ids("<|begin_of_image|>"),
            image_end_token_id=ids("<|end_of_image|>"), video_start_token_id=ids("<|begin_of_video|>"),
            video_end_token_id=ids("<|end_of_video|>"), tie_word_embeddings=False,
        )
