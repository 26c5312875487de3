"""The plain padded training path on the tiny LLaVA model: exact log-probs, learning, save and resume."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from mdpo_fast.cli import parse_config, run_training
from mdpo_fast.collate import PaddedCollator
from mdpo_fast.data import prepare_dataset
from mdpo_fast.demo_data import demo_records
from mdpo_fast.families import family_for
from mdpo_fast.modeling import padded_answer_tokens, sequence_logps
from mdpo_fast.tiny import build_tiny_model
from mdpo_fast.trainer import MDPOTrainer

FAST = {"lora_r": 8, "lora_alpha": 16, "max_length": 128, "report_to": "none", "disable_tqdm": True}


def _config(tmp_path, **overrides):
    values = {**FAST, "output_dir": str(tmp_path / "out"), "use_cpu": True, **overrides}
    return parse_config([], values)


def _independent_logps(model, item, answer_ids, image: dict, image_token_id: int):
    """One sequence alone through the model's own full-logits forward: sum of answer-token log-probs."""
    prompt = list(item["example"].prompt_ids)
    ids = torch.tensor([prompt + list(answer_ids)])
    token_types = {"mm_token_type_ids": (ids == image_token_id).long()} if "image_grid_thw" in image else {}
    logits = model(input_ids=ids, **image, **token_types).logits[0].double()
    logp = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None]).squeeze(1)
    return logp[len(prompt) - 1 :].sum()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_padded_layout_logps_match_each_sequence_alone(tmp_path, family):
    model, processor = build_tiny_model(family=family)
    args = _config(tmp_path)
    records = [dataclasses.replace(r, image=r.image.resize((32 + 24 * (r.index % 3), 32)))  # Qwen: three grids
               for r in demo_records(n=5, seed=3)]
    dataset = prepare_dataset(args, processor, records=records, source="demo")
    items = [dataset[i] for i in range(5)]
    image_id = processor.image_token_id
    batch = PaddedCollator(processor.tokenizer.pad_token_id, family_for(model.config), model.config)(items)
    assert batch["input_ids"].shape[0] == 15  # three branches of five examples
    if family != "llava":
        assert len({tuple(it["image"]["image_grid_thw"][0].tolist()) for it in items}) == 3
    with torch.no_grad():
        got = sequence_logps(model, padded_answer_tokens(model, batch))
        expected = torch.tensor([
            [
                _independent_logps(model, it, it["example"].chosen_ids, it["image"], image_id),
                _independent_logps(model, it, it["example"].rejected_ids, it["image"], image_id),
                _independent_logps(model, it, it["example"].chosen_ids, it["corrupted_image"], image_id),
            ]
            for it in items
        ], dtype=torch.float64)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    assert not torch.equal(got[:, 0], got[:, 2])  # the corrupted image really changes the branch


def _losses(output_dir) -> dict[int, float]:
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


@pytest.mark.slow
def test_demo_steps_lower_the_loss(tmp_path):
    model, processor = build_tiny_model()
    args = _config(tmp_path, max_steps=40, logging_steps=10, learning_rate=2e-3, per_device_train_batch_size=8,
                   lr_scheduler_type="constant", save_strategy="no")
    trainer = run_training(args, model, processor, demo_records(n=64), source="demo")
    logs = [e for e in trainer.state.log_history if "rewards/accuracies" in e]
    assert len(logs) == 4
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.1
    assert logs[-1]["rewards/imageless_accuracies"] > 0.5
    for name in ("rewards/chosen", "logps/imageless_chosen", "rewards/imageless_margins"):
        assert name in logs[-1]


@pytest.mark.slow
def test_save_and_resume_reproduce_the_same_steps(tmp_path):
    common = dict(max_steps=6, logging_steps=1, learning_rate=1e-3, per_device_train_batch_size=4,
                  save_steps=3, seed=7)
    records = demo_records(n=40)
    model, processor = build_tiny_model()
    full = run_training(_config(tmp_path / "a", **common), model, processor, records, source="demo")
    out_a = Path(full.args.output_dir)
    assert (out_a / "adapter_config.json").exists() and (out_a / "adapter_model.safetensors").exists()
    assert (out_a / "processor_config.json").exists() or (out_a / "preprocessor_config.json").exists()
    checkpoint = out_a / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").exists() and (checkpoint / "optimizer.pt").exists()

    model, processor = build_tiny_model()  # the same initial weights; the checkpoint restores the rest
    resumed = run_training(
        _config(tmp_path / "b", **common, resume_from_checkpoint=str(checkpoint)), model, processor, records,
        source="demo",
    )
    a, b = _losses(out_a), _losses(resumed.args.output_dir)  # b holds the checkpoint's history for steps 1-3
    assert sorted(b) == [1, 2, 3, 4, 5, 6] and resumed.state.global_step == 6
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), (step, a[step], b[step])


def test_lora_initialisation_follows_the_seed(tmp_path):
    from mdpo_fast.modeling import prepare_model

    weights = []
    for before, seed in ((1, 3), (2, 3), (1, 4)):
        model, _ = build_tiny_model()
        torch.manual_seed(before)  # whatever consumed random numbers before (loading from disk does not seed)
        policy, _ = prepare_model(model, _config(tmp_path, seed=seed))
        weights.append({n: p.detach().clone() for n, p in policy.named_parameters() if "lora_A" in n})
    assert weights[0] and all(torch.equal(w, weights[1][n]) for n, w in weights[0].items())  # the seed decides
    assert not any(torch.equal(w, weights[2][n]) for n, w in weights[0].items())  # another seed, other weights


@pytest.mark.slow
@pytest.mark.parametrize("precompute", [False, True], ids=["live-reference", "precomputed"])
def test_full_finetuning_keeps_a_frozen_reference(tmp_path, precompute, monkeypatch):
    import gc
    import weakref

    model, processor = build_tiny_model()
    before = model.lm_head.weight.detach().clone()
    vision_before = next(model.model.vision_tower.parameters()).detach().clone()
    args = _config(tmp_path, use_lora=False, max_steps=3, learning_rate=1e-3, per_device_train_batch_size=4,
                   save_strategy="no", logging_steps=1, precompute_ref_logps=precompute)
    copies, alive = [], []  # the reference copy, and at each step whether it is still in memory
    real = MDPOTrainer.precompute_reference

    class Probe(TrainerCallback):
        def on_step_begin(self, *_, **__):
            gc.collect()
            alive.append(copies[0]() is not None)

    def watched(self):
        copies.append(weakref.ref(self.reference_model))
        real(self)
        self.add_callback(Probe())
    monkeypatch.setattr(MDPOTrainer, "precompute_reference", watched)
    trainer = run_training(args, model, processor, demo_records(n=12), source="demo")
    assert not torch.equal(trainer.model.lm_head.weight, before)  # the policy trained
    if precompute:
        assert alive == [False] * 3  # freed while training, once its log-probs are cached
        with pytest.raises(ValueError, match="let its reference copy go"):  # not silently the policy instead
            trainer.reference_logps(next(iter(trainer.get_train_dataloader())))
    else:
        torch.testing.assert_close(trainer.reference_model.lm_head.weight, before)  # the reference did not train
    torch.testing.assert_close(next(trainer.model.model.vision_tower.parameters()), vision_before)
    first = trainer.state.log_history[0]
    assert first["rewards/chosen"] == 0 and first["rewards/margins"] == 0  # step 1: policy == reference
