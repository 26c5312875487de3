"""`mdpo-fast export`: a LoRA run's adapters merged into the base weights, loadable as a plain transformers model,
with the adapter model's own log-probs."""

import pytest
import torch

from mdpo_fast import cli


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_dir, demo_dir):
    out = tmp_path_factory.mktemp("run") / "out"
    code = cli.main(["train", "--model_name_or_path", str(tiny_dir), "--dataset", str(demo_dir / "train.jsonl"),
                     "--image_root", str(demo_dir), "--output_dir", str(out), "--max_steps", "3",
                     "--learning_rate", "2e-2", "--lora_r", "4", "--lora_alpha", "8", "--use_cpu", "true",
                     "--disable_tqdm", "true", "--report_to", "none", "--dataloader_num_workers", "0",
                     "--per_device_train_batch_size", "4", "--save_strategy", "no"])
    assert code == 0 and (out / "adapter_config.json").is_file()
    return out


def _answer_logps(model, processor, demo_dir):
    from mdpo_fast.records import load_records

    record = load_records(demo_dir / "train.jsonl", image_root=demo_dir)[0][0]
    prompt = processor.apply_chat_template(list(record.prompt), tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[prompt + record.chosen], images=[record.image], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0].double()
    ids = inputs["input_ids"][0]
    return torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None]).squeeze(1)


def test_the_merged_model_gives_the_adapter_models_log_probs(run_dir, tiny_dir, demo_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    assert cli.main(["export", str(run_dir), str(tmp_path / "merged")]) == 0
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    adapted = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_dir), str(run_dir)).eval()
    base = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
    want = _answer_logps(adapted, processor, demo_dir)
    torch.testing.assert_close(_answer_logps(merged, processor, demo_dir), want, rtol=0, atol=1e-5)
    assert (_answer_logps(base, processor, demo_dir) - want).abs().max() > 1e-3  # the adapters changed something


def test_export_refuses_to_overwrite_or_to_merge_nothing(run_dir, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("a user's file")
    assert cli.main(["export", str(run_dir), str(taken)]) == 2
    assert capsys.readouterr().err == (f"mdpo-fast: error: {taken} exists and is not an empty folder: export writes "
                                       "into a new one\n")
    assert (taken / "keep.txt").read_text() == "a user's file"
    assert cli.main(["export", str(tmp_path), str(tmp_path / "new")]) == 2
    assert "holds no LoRA adapters" in capsys.readouterr().err
    assert cli.main(["export", str(run_dir)]) == 2
    assert capsys.readouterr().err.startswith("mdpo-fast: error: usage: mdpo-fast export CHECKPOINT OUT_DIR")


def test_eval_scores_a_data_set_as_training_computes_it(run_dir, tiny_dir, demo_dir, tmp_path, capsys):
    """`mdpo-fast eval`: the same per-record log-probs in the packed and padded layouts, equal to the adapter
    model's own plain forward of a record; metrics printed and written; the base alone has zero rewards."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    common = ["--model_name_or_path", str(tiny_dir), "--dataset", str(demo_dir / "train.jsonl"), "--image_root",
              str(demo_dir), "--use_cpu", "true", "--dataloader_num_workers", "0", "--max_length", "128"]
    rows = {}
    for packing in ("true", "false"):
        out = tmp_path / f"eval-{packing}"
        assert cli.main(["eval", *common, "--adapter", str(run_dir), "--packing", packing, "--output_dir",
                         str(out), "--per_example", str(out / "records.jsonl")]) == 0
        printed = capsys.readouterr().out
        metrics = json.loads((out / "eval_metrics.json").read_text())
        assert metrics["examples"] == 24 and f"{metrics['rewards/accuracies']:.6g}" in printed
        rows[packing] = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in rows["true"]) == list(range(24))
    by_index = {r["index"]: r for r in rows["false"]}
    for r in rows["true"]:
        for key in ("logps", "ref_logps"):
            for branch, value in r[key].items():
                assert value == pytest.approx(by_index[r["index"]][key][branch], abs=1e-4)
    from mdpo_fast.cli import parse_config
    from mdpo_fast.data import prepare_dataset
    from mdpo_fast.families import family_for
    from mdpo_fast.layout_check import plain_logps

    adapted = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_dir), str(run_dir)).eval()
    processor = AutoProcessor.from_pretrained(run_dir)
    dataset = prepare_dataset(parse_config([], {"output_dir": str(tmp_path / "x"), "dataset": str(demo_dir /
                              "train.jsonl"), "image_root": str(demo_dir), "max_length": 128}), processor)
    ex, (image, _) = dataset.examples[dataset.row_of(0)], dataset.images(dataset.row_of(0))
    with torch.no_grad():
        want = plain_logps(adapted, processor, family_for(adapted.config), ex.prompt_text, ex.chosen_text,
                           ex.prompt_ids, ex.chosen_ids, image, where="test")
        with adapted.disable_adapter():
            want_ref = plain_logps(adapted, processor, family_for(adapted.config), ex.prompt_text, ex.chosen_text,
                                   ex.prompt_ids, ex.chosen_ids, image, where="test")
    assert by_index[0]["logps"]["chosen"] == pytest.approx(want.item(), abs=1e-4)
    assert by_index[0]["ref_logps"]["chosen"] == pytest.approx(want_ref.item(), abs=1e-4)
    assert abs(want - want_ref) > 1e-3  # the adapters matter
    assert cli.main(["eval", *common, "--output_dir", str(tmp_path / "base")]) == 0  # no adapters: policy = reference
    base = json.loads((tmp_path / "base" / "eval_metrics.json").read_text())
    assert base["rewards/chosen"] == 0 and base["rewards/margins"] == 0
