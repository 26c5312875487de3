"""Qwen2-VL and Qwen2.5-VL: 3-D positions against the model's own, and the packed layout exact against the
padded one (which runs the model's own forward) with images of different sizes."""

import dataclasses
import json

import pytest
import torch

from mdpo_fast.cli import parse_config
from mdpo_fast.data import prepare_dataset
from mdpo_fast.demo_data import demo_records
from mdpo_fast.families import family_for
from mdpo_fast.families.mrope import mrope_positions
from mdpo_fast.modeling import prepare_model
from mdpo_fast.tiny import build_tiny_model
from mdpo_fast.trainer import MDPOTrainer
from tests.conftest import randomize_lora

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v"]  # every M-RoPE family
# width x height, each its own grid of patches (dynamic resolution), non-square ones included
SIZES = [(56, 112), (112, 56), (84, 84), (32, 32), (84, 112), (56, 84)]


def _records(n=6, seed=5):
    return [dataclasses.replace(r, image=r.image.resize(SIZES[i % len(SIZES)]))
            for i, r in enumerate(demo_records(n=n, seed=seed))]


def _args(tmp_path, **values):
    return parse_config([], {"output_dir": str(tmp_path), "use_cpu": True, "report_to": "none", "lora_r": 4,
                             "lora_alpha": 8, "max_tokens_per_batch": 400, **values})


@pytest.fixture(scope="module", params=FAMILIES)
def qwen_setup(request, tmp_path_factory):
    model, processor = build_tiny_model(family=request.param)
    args = _args(tmp_path_factory.mktemp("o"))
    policy, _ = prepare_model(model, args)
    randomize_lora(policy)
    dataset = prepare_dataset(args, processor, records=_records(), source="demo", family=family_for(model.config))
    return policy, processor, dataset


def test_mrope_positions_match_the_models_get_rope_index(qwen_setup):
    policy, processor, dataset = qwen_setup
    inner = policy.get_base_model().model
    merge = inner.config.vision_config.spatial_merge_size
    grids = set()
    for i in range(len(dataset)):
        item = dataset[i]
        ex, grid = item["example"], item["image"]["image_grid_thw"]
        ids = torch.tensor([ex.prompt_ids + ex.chosen_ids])
        types = (ids == processor.image_token_id).long()
        want, _ = inner.get_rope_index(ids, types, image_grid_thw=grid)
        prompt, after = mrope_positions(ex.prompt_ids, processor.image_token_id, grid, merge)
        answer = torch.arange(after, after + len(ex.chosen_ids)).expand(3, -1)
        torch.testing.assert_close(torch.cat([prompt, answer], dim=1), want[:, 0], rtol=0, atol=0)
        grids.add(tuple(grid[0].tolist()))
    assert len(grids) == len(SIZES)


def test_image_tokens_must_match_their_grid():
    with pytest.raises(ValueError, match="image grid 1x2x2 is larger than its 3 image tokens"):
        mrope_positions([5, 9, 9, 9, 6], 9, torch.tensor([[1, 4, 4]]), 2)
    with pytest.raises(ValueError, match="no image_grid_thw row left"):
        mrope_positions([5, 9, 9, 9, 9, 9], 9, torch.tensor([[1, 4, 4]]), 2)
    with pytest.raises(ValueError, match="more image_grid_thw rows than images"):
        mrope_positions([5, 9, 9, 9, 9, 6], 9, torch.tensor([[1, 4, 4], [1, 4, 4]]), 2)


def _step(policy, processor, dataset, tmp_path, ref_logps=None, **layout):
    trainer = MDPOTrainer(policy, _args(tmp_path, **layout), dataset, processor)
    items = [dataset[i] for i in range(len(dataset))]
    for item in items if ref_logps is not None else []:
        item["ref_logps"] = ref_logps[item["example"].index]
    batch = trainer.data_collator(items)
    assert ("rope_position_ids" in batch) == trainer.args.packing  # packed: our positions; padded: the model's
    policy.zero_grad()
    loss, metrics = trainer.compute_loss(policy, batch, return_outputs=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
    return loss.detach(), metrics, grads, trainer


@pytest.mark.parametrize("prefix_sharing", [True, False], ids=["shared-prefix", "no-sharing"])
def test_packed_equals_padded(qwen_setup, tmp_path, prefix_sharing):
    policy, processor, dataset = qwen_setup
    want_loss, want, want_grads, _ = _step(policy, processor, dataset, tmp_path / "a", packing=False)
    ref = None
    if prefix_sharing:  # the precomputed reference once per family
        _, _, _, trainer = _step(policy, processor, dataset.subset(dataset.examples), tmp_path / "b")
        trainer.precompute_reference()
        ref = trainer.train_dataset.ref_logps
    loss, got, grads, _ = _step(policy, processor, dataset, tmp_path / "c", ref, prefix_sharing=prefix_sharing)
    assert want["policy_logps"].shape == (6, 3)
    torch.testing.assert_close(got["policy_logps"], want["policy_logps"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["ref_logps"], want["ref_logps"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want["policy_logps"], want["ref_logps"])  # the adapters matter
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == want_grads.keys() and len(grads) > 0
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_positions_matter(qwen_setup, tmp_path):
    """The exactness above would not notice 1-D positions if the model ignored them: it does not."""
    policy, processor, dataset = qwen_setup
    trainer = MDPOTrainer(policy, _args(tmp_path), dataset, processor)
    batch = trainer.data_collator([dataset[i] for i in range(3)])
    with torch.no_grad():
        right = trainer.reference_logps(batch)
        batch["rope_position_ids"] = batch["position_ids"].expand(3, -1, -1)
        wrong = trainer.reference_logps(batch)
    assert (right - wrong).abs().max() > 1e-3


def test_flash_varlen_gets_1d_segment_positions_ahead_of_the_3d_ones(qwen_setup, tmp_path, monkeypatch):
    # flash-attn is not installable on CPU: check what our side hands to the model.
    import mdpo_fast.modeling as modeling

    policy, processor, dataset = qwen_setup
    trainer = MDPOTrainer(policy, _args(tmp_path, prefix_sharing=False, max_tokens_per_batch=120), dataset,
                          processor)
    batch = trainer.data_collator([dataset[i] for i in range(3)])
    seen = {}
    monkeypatch.setattr(modeling, "last_hidden_states", lambda model, inputs: seen.update(inputs) or torch.zeros(
        *inputs["input_ids"].shape, 128))
    monkeypatch.setattr(policy.get_base_model().config.get_text_config(), "_attn_implementation", "flash_attention_2")
    modeling.packed_answer_tokens(policy, batch, modeling.image_features(policy, batch))
    rows, width = batch["input_ids"].shape
    positions = seen["position_ids"]
    assert rows > 1 and seen["attention_mask"] is None and positions.shape == (4, 1, rows * width)
    torch.testing.assert_close(positions[0, 0], batch["position_ids"].flatten())  # segments restart at 0
    torch.testing.assert_close(positions[1:, 0], batch["rope_position_ids"].flatten(1))


def _hub_layout(processor, directory):
    """A folder laid out as Qwen2-VL repos on the hub are: processor_class in preprocessor_config.json, the chat
    template in chat_template.json, a video processor config beside them."""
    directory.mkdir()
    processor.tokenizer.save_pretrained(directory)
    settings = {**processor.image_processor.to_dict(), "processor_class": "Qwen2VLProcessor"}
    (directory / "preprocessor_config.json").write_text(json.dumps(settings))
    (directory / "video_preprocessor_config.json").write_text(json.dumps(settings))
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}))
    return directory


def test_processors_load_from_the_hub_layout_and_from_our_checkpoints(tmp_path):
    # Without torchvision (as here) through the image-only class; with it, through AutoProcessor.
    from mdpo_fast.processors import load_processor
    from mdpo_fast.tiny import build_processor

    processor = build_processor("qwen2_vl")
    processor.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "preprocessor_config.json").exists()  # what AutoProcessor falls back to
    record = _records(n=1)[0]
    prompt = processor.apply_chat_template(list(record.prompt), tokenize=False, add_generation_prompt=True)
    want = processor(text=prompt, images=record.image, return_tensors="pt")
    for folder in (tmp_path / "saved", _hub_layout(processor, tmp_path / "hub")):
        loaded = load_processor(str(folder))
        assert type(loaded).__name__ == "Qwen2VLProcessor"
        assert loaded.apply_chat_template(list(record.prompt), tokenize=False, add_generation_prompt=True) == prompt
        got = loaded(text=prompt, images=record.image, return_tensors="pt")
        for key in ("input_ids", "pixel_values", "image_grid_thw"):
            torch.testing.assert_close(got[key], want[key], msg=key)
