"""A branch costs only when the objective needs it: plain DPO (loss_weights 1 0 0) builds no corrupted-image
branch, and loses nothing by it."""

import pytest
import torch

from mdpo_fast.cli import parse_config
from mdpo_fast.data import prepare_dataset
from mdpo_fast.demo_data import demo_records
from mdpo_fast.modeling import prepare_model
from mdpo_fast.ops.loss import IMAGELESS_METRICS, METRIC_NAMES
from mdpo_fast.ref_cache import fingerprint
from mdpo_fast.tiny import build_tiny_model
from mdpo_fast.trainer import MDPOTrainer
from tests.conftest import randomize_lora


def _config(tmp_path, **overrides):
    return parse_config([], {"output_dir": str(tmp_path), "use_cpu": True, "report_to": "none", "lora_r": 8,
                             "lora_alpha": 16, "max_length": 128, "dataloader_num_workers": 0,
                             "precompute_ref_logps": False, "per_device_train_batch_size": 6, **overrides})


def _first_step(tmp_path, **overrides):
    model, processor = build_tiny_model()
    args = _config(tmp_path, **overrides)
    dataset = prepare_dataset(args, processor, records=demo_records(n=6), source="demo")
    policy, reference = prepare_model(model, args)
    randomize_lora(policy)
    trainer = MDPOTrainer(policy, args, dataset, processor, reference_model=reference)
    batch = next(iter(trainer.get_train_dataloader()))
    loss, metrics = trainer.compute_loss(policy, batch, return_outputs=True)  # the layout check runs here too
    trainer.log({"loss": loss.item()})  # what a training log line holds after this step
    return dataset, batch, loss, metrics, set(trainer.state.log_history[-1])


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_plain_dpo_builds_no_corrupted_branch_and_loses_nothing(tmp_path, packing):
    plain = _first_step(tmp_path / "plain", loss_weights=[1, 0, 0], packing=packing)
    full = _first_step(tmp_path / "full", loss_weights=[1, 0, 0], packing=packing, imageless_metrics=True)
    dataset, batch, loss, metrics, logged = plain
    assert "corrupted_image" not in dataset[0] and "corrupted_image" in full[0][0]
    tokens, images = batch["stats"].tokens, batch["stats"].images
    full_tokens, full_images = full[1]["stats"].tokens, full[1]["stats"].images
    # packed: one image per example, not two; padded: two rows per example, not three
    assert (images, full_images) == ((6, 12) if packing else (12, 18))
    assert tokens < 0.8 * full_tokens
    torch.testing.assert_close(loss, full[2])
    for name in METRIC_NAMES:
        if name not in IMAGELESS_METRICS:
            torch.testing.assert_close(metrics[name], full[3][name])
    assert not logged & set(IMAGELESS_METRICS) and set(IMAGELESS_METRICS) <= full[4]  # no made-up zeros


def test_the_branches_built_are_part_of_the_reference_cache_key(tmp_path):
    examples = prepare_dataset(_config(tmp_path), build_tiny_model()[1], records=demo_records(n=3)).examples
    keys = {fingerprint(_config(tmp_path, loss_weights=w, imageless_metrics=m), examples)
            for w, m in (([1, 0, 0], False), ([1, 0, 1], False), ([1, 0, 0], True), ([1, 1, 1], False))}
    assert len(keys) == 2  # 2 branches (plain DPO, with or without the anchor) or 3


def test_a_set_prepared_without_corrupted_images_is_refused_where_they_are_needed(tmp_path):
    model, processor = build_tiny_model()
    dataset = prepare_dataset(_config(tmp_path, loss_weights=[1, 0, 0]), processor, records=demo_records(n=3))
    policy, reference = prepare_model(model, _config(tmp_path))
    with pytest.raises(ValueError, match="prepared without corrupted images"):
        MDPOTrainer(policy, _config(tmp_path), dataset, processor, reference_model=reference)
