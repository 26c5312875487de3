"""Held-out evaluation: the seeded split, the image swap (exact against the model's own forward), and evaluation
through the Trainer's loop (eval_ metrics, cached reference, best model)."""

import dataclasses
import json

import pytest
import torch

from mdpo_fast.cli import parse_config, run_training, summary
from mdpo_fast.data import prepare_dataset
from mdpo_fast.demo_data import demo_records
from mdpo_fast.families import family_for
from mdpo_fast.heldout import SwapDataset, cached_reference, image_key, split_rows, swap_partners
from mdpo_fast.layout_check import plain_logps
from mdpo_fast.modeling import prepare_model, sequence_logps
from mdpo_fast.tiny import build_tiny_model
from mdpo_fast.trainer import MDPOTrainer
from tests.conftest import randomize_lora


def _args(tmp_path, **values):
    return parse_config([], {"output_dir": str(tmp_path), "use_cpu": True, "report_to": "none", "lora_r": 4,
                             "lora_alpha": 8, "disable_tqdm": True, "save_strategy": "no", **values})


def test_the_split_is_seeded_disjoint_and_complete():
    train, held = split_rows(100, 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90 and not set(train) & set(held)
    assert sorted({*train, *held}) == list(range(100))
    again, other = split_rows(100, 0.1, seed=3)[1], split_rows(100, 0.1, seed=4)[1]
    assert list(again) == list(held) and list(other) != list(held)
    assert len(split_rows(5, 0.01, seed=0)[1]) == 1 and len(split_rows(5, 0.99, seed=0)[0]) == 1
    with pytest.raises(ValueError, match="at least 2 examples"):
        split_rows(1, 0.5, seed=0)


def test_swap_partners_show_every_example_another_picture():
    keys = ["a"] * 3 + ["b"] * 2 + ["c"] * 4 + ["d"]
    partners = swap_partners(keys, seed=0)
    assert sorted(partners) == list(range(len(keys)))  # a permutation
    assert all(keys[j] != keys[i] for i, j in enumerate(partners))  # never the same picture, so no fixed point
    assert partners == swap_partners(keys, seed=0) and partners != swap_partners(keys, seed=1)
    crowded = swap_partners(["a"] * 5 + ["b"], seed=0)  # a picture in over half the set: some pairs impossible
    assert None in crowded and all(j is None or (i == 5) != (j == 5) for i, j in enumerate(crowded))


def test_one_picture_has_one_key_however_it_is_referenced(tmp_path):
    import io

    from PIL import Image

    red, blue = Image.new("RGB", (8, 6), (200, 0, 0)), Image.new("RGB", (8, 6), (0, 0, 200))
    encoded = io.BytesIO()
    red.save(encoded, "PNG")
    (tmp_path / "red.png").write_bytes(encoded.getvalue())
    keys = {image_key(encoded.getvalue()), image_key(str(tmp_path / "red.png")), image_key(tmp_path / "red.png")}
    assert len(keys) == 1 and image_key(red) == image_key(red.copy()) != image_key(blue)


def test_swapped_log_probs_equal_the_models_own_forward_with_the_other_image(tmp_path):
    """Dynamic resolution (Qwen2-VL): the prompt shown another image of another size is tokenized again, and the
    chosen answer's log-prob in the run's layout equals the plain forward of that prompt with that image."""
    model, processor = build_tiny_model(family="qwen2_vl")
    sizes = [(32, 32), (64, 32), (32, 64), (64, 16)]
    records = [dataclasses.replace(r, image=r.image.resize(sizes[i])) for i, r in enumerate(demo_records(n=4, seed=5))]
    args = _args(tmp_path)
    family = family_for(model.config)
    policy, _ = prepare_model(model, args)
    randomize_lora(policy)
    dataset = prepare_dataset(args, processor, records=records, source="demo", family=family)
    swap = SwapDataset(dataset, seed=0)
    assert len(swap) == 4
    for packing in (True, False):
        trainer = MDPOTrainer(policy, _args(tmp_path, packing=packing), dataset, processor)
        batch = trainer.collator(trainer.args, 1)([swap[k] for k in range(len(swap))])
        with torch.no_grad():
            got = sequence_logps(policy, trainer.answer_tokens(policy, batch))[:, 0]
            for k, (i, j) in enumerate(swap.pairs):
                ex, image = dataset.examples[i], dataset.images(j)[0]
                assert image.size != dataset.images(i)[0].size or sizes[i] == sizes[j]
                item = swap[k]["example"]
                want = plain_logps(policy, processor, family, ex.prompt_text, ex.chosen_text, item.prompt_ids,
                                   ex.chosen_ids, image, where="test")
                torch.testing.assert_close(got[k], want, rtol=0, atol=1e-4)
    lengths = {len(swap[k]["example"].prompt_ids) - len(dataset.examples[i].prompt_ids)
               for k, (i, _) in enumerate(swap.pairs)}
    assert lengths != {0}  # the other image's size changed the prompt: tokenized again, not reused
    assert image_key(dataset.examples[0].image) != image_key(dataset.examples[1].image)


def test_eval_through_the_trainer_loop(tmp_path):
    """--eval_split: eval_ metrics of every training metric and the image swap at eval_steps, the held-out
    reference cached beside training's, rewards exactly 0 before training, the best checkpoint loaded at the end."""
    model, processor = build_tiny_model()
    args = _args(tmp_path, max_steps=4, eval_split=0.25, eval_steps=2, logging_steps=2, save_strategy="steps",
                 save_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_rewards/accuracies",
                 per_device_train_batch_size=4, learning_rate=1e-2)
    assert args.eval_strategy == "steps"
    records = demo_records(n=32, seed=0)
    trainer = run_training(args, model, processor, records, source="demo")
    train, held = trainer.train_dataset, trainer.eval_dataset
    assert len(held) == 8 and len(train) == 24
    assert not {ex.index for ex in train.examples} & {ex.index for ex in held.examples}
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4]
    for name in ("eval_rewards/accuracies", "eval_rewards/imageless_accuracies", "eval_logps/chosen",
                 "eval_image/swap_accuracy", "eval_image/swap_margin", "eval_ref_image/swap_accuracy"):
        assert name in evals[-1], name
    assert len(list((tmp_path / "ref_logps").iterdir())) == 2  # training's and the held-out set's
    assert set(held.ref_logps) == {ex.index for ex in held.examples}
    best = max(evals, key=lambda e: e["eval_rewards/accuracies"])
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")


def test_before_training_the_policy_is_the_reference(tmp_path):
    model, processor = build_tiny_model()
    args = _args(tmp_path, eval_split=0.25, max_steps=0)
    dataset = prepare_dataset(args, processor, records=demo_records(n=16, seed=0), source="demo")
    from mdpo_fast.heldout import split_dataset

    train, held = split_dataset(dataset, args.eval_split, args.seed)
    policy, _ = prepare_model(model, args)
    metrics = {}
    for packing in (True, False):
        views = train.subset(train.examples), held.subset(held.examples)  # each trainer caches into its own
        trainer = MDPOTrainer(policy, _args(tmp_path / str(packing), packing=packing, eval_split=0.25), views[0],
                              processor, eval_dataset=views[1])
        trainer.precompute_reference()
        # the cache the image swap reads against a live pass over a view without one
        cached, live = cached_reference(views[1]), trainer.branch_logps(held.subset(held.examples), 1, policy=False)
        assert held.ref_logps is None and views[1].ref_logps is not None
        order = [cached.indices.tolist().index(i) for i in live.indices.tolist()]
        torch.testing.assert_close(cached.reference[order, 0], live.reference[:, 0])
        metrics[packing] = trainer.evaluate()
    got = metrics[True]
    assert got["eval_rewards/chosen"] == 0 and got["eval_rewards/margins"] == 0
    assert got["eval_image/swap_accuracy"] == got["eval_ref_image/swap_accuracy"]
    for name, value in got.items():  # packed and padded layouts: the same held-out numbers
        assert value == pytest.approx(metrics[False][name], abs=1e-4), name


def test_an_eval_dataset_is_prepared_like_the_training_set_and_never_is_it(tmp_path, demo_dir):
    data = str(demo_dir / "train.jsonl")
    with pytest.raises(ValueError, match="--eval_dataset is the training set itself"):
        _args(tmp_path, dataset=data, eval_dataset=data, eval_dataset_split="train")
    model, processor = build_tiny_model()
    records = demo_records(n=16, seed=1)
    args = _args(tmp_path, eval_dataset=data, image_root=str(demo_dir), max_steps=1, eval_steps=1)
    trainer = run_training(args, model, processor, records, source="demo")
    assert len(trainer.eval_dataset) == 24 and len(trainer.train_dataset) == 16
    assert any("eval_image/swap_accuracy" in e for e in trainer.state.log_history)
    with pytest.raises(ValueError, match="not both"):
        _args(tmp_path, eval_dataset="x.jsonl", eval_split=0.1)


def test_the_summary_shows_held_out_metrics_and_the_swap_before_and_after():
    logs = [{"step": 10, "loss": 1.0, "rewards/accuracies": 0.5},
            {"step": 10, "eval_loss": 1.2, "eval_rewards/accuracies": 0.4, "eval_image/swap_accuracy": 0.55,
             "eval_ref_image/swap_accuracy": 0.5},
            {"step": 20, "eval_loss": 1.0, "eval_rewards/accuracies": 0.6, "eval_image/swap_accuracy": 0.7,
             "eval_ref_image/swap_accuracy": 0.5}]
    text = summary(logs, "out")
    assert "eval_rewards/accuracies          0.4000 (step 10) ->   0.6000 (step 20)" in text
    assert "eval_image/swap_accuracy         0.5000 (before)  ->   0.7000 (step 20)" in text


def test_eval_metrics_json_has_the_image_swap(tmp_path, tiny_dir, demo_dir):
    from mdpo_fast.evaluate import evaluate

    args = _args(tmp_path / "eval", model_name_or_path=str(tiny_dir), dataset=str(demo_dir / "train.jsonl"),
                 image_root=str(demo_dir), precompute_ref_logps=False)
    result = evaluate(args)
    written = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert written == result and result["image/swap_accuracy"] == result["ref_image/swap_accuracy"]
    assert result["rewards/margins"] == 0 and 0 <= result["image/swap_accuracy"] <= 1


def test_full_fine_tuning_evaluates_after_its_reference_copy_is_freed(tmp_path):
    """The reference copy goes once the reference log-probs are cached: its image swap is measured before."""
    model, processor = build_tiny_model()
    args = _args(tmp_path, use_lora=False, max_steps=2, eval_split=0.25, eval_steps=2, logging_steps=2)
    trainer = run_training(args, model, processor, demo_records(n=16, seed=2), source="demo")
    assert trainer.reference_model is None
    last = [e for e in trainer.state.log_history if "eval_loss" in e][-1]
    assert 0 <= last["eval_ref_image/swap_accuracy"] <= 1 and "eval_image/swap_margin" in last


def test_a_set_given_to_evaluate_is_checked_like_those_given_at_init(tmp_path):
    from mdpo_fast.records import DataError

    model, processor = build_tiny_model()
    args = _args(tmp_path, precompute_ref_logps=False)
    train = prepare_dataset(args, processor, records=demo_records(n=8), source="demo")
    trainer = MDPOTrainer(prepare_model(model, args).policy, args, train, processor)
    processor.tokenizer.add_tokens(["<unseen>"])  # the tokenizer outgrows the model after the trainer is built
    records = demo_records(n=4, seed=1)
    records[1] = dataclasses.replace(records[1], chosen=records[1].chosen + " <unseen>")
    other = prepare_dataset(args, processor, records=records, source="other")
    with pytest.raises(DataError) as refused:
        trainer.evaluate(other)
    (line,) = refused.value.problems
    assert line.startswith("example 1: token id ") and "outside the model's vocabulary" in line
