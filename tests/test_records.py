"""Records: every supported format, and a clear error naming the record for each kind of bad input."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from mdpo_fast.cli import parse_config
from mdpo_fast.data import prepare_dataset
from mdpo_fast.examples import build_examples
from mdpo_fast.records import ArrowImage, DataError, load_image, load_records


def _png(path=None, size=(20, 16), noise=False):
    # noise: a textured image, so a crop differs from the whole and a cut file is cut mid-data
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8) if noise else None
    image = Image.fromarray(pixels) if noise else Image.new("RGB", size, (200, 30, 30))
    if path is None:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    image.save(path)
    return path


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mdpo_jsonl_with_image_root(tmp_path):
    (tmp_path / "img").mkdir()
    _png(tmp_path / "img" / "a.png")
    rows = [{"img_path": "a.png", "prompt": "<image>\nWhat is it?", "chosen": "Red.", "rejected": "Blue."}]
    records, problems = load_records(_jsonl(tmp_path / "d.jsonl", rows), image_root=tmp_path / "img")
    assert problems == []
    (r,) = records
    assert r.index == 0 and r.chosen == "Red." and r.rejected == "Blue."
    # "<image>" in a plain prompt becomes the image slot of the user turn
    assert r.prompt == ({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},)


def test_json_list_and_trl_conversational(tmp_path):
    img = str(_png(tmp_path / "a.png"))
    rows = [{
        "images": [img],
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Colour?"}, {"type": "image"}]},
        ],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Red."}]}],
        "rejected": [{"role": "assistant", "content": "Blue."}],
    }]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    (r,), problems = load_records(path)
    assert problems == [] and r.chosen == "Red." and r.rejected == "Blue."
    assert r.prompt[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert r.prompt[1]["content"][1] == {"type": "image"}  # placement kept as given


def test_hf_dataset_rlaif_v_layout(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({
        "image": [Image.new("RGB", (8, 8), (0, 0, 255)), Image.new("RGB", (8, 8), (0, 255, 0))],
        "question": ["Colour?", "And this one?"],
        "chosen": ["Blue.", "Green."],
        "rejected": ["Red.", "Blue."],
    })
    ds.save_to_disk(str(tmp_path / "ds"))
    records, problems = load_records(tmp_path / "ds")
    assert problems == [] and [r.chosen for r in records] == ["Blue.", "Green."]
    # referenced in the memory-mapped Arrow files, read (still compressed) only when used
    assert isinstance(records[0].image, ArrowImage) and isinstance(records[0].image.read(), bytes)
    assert load_image(records[1].image).getpixel((0, 0)) == (0, 255, 0)


def test_trl_plain_with_image_bytes(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({
        "images": [[Image.new("RGB", (8, 8))]], "prompt": ["Describe."], "chosen": ["Dark."], "rejected": ["Light."],
    })
    ds.save_to_disk(str(tmp_path / "ds"))
    (r,), problems = load_records(tmp_path / "ds")
    assert problems == [] and r.chosen == "Dark." and isinstance(r.image.read(), bytes)  # the list's one image


def test_every_bad_record_is_named(tmp_path):
    good = str(_png(tmp_path / "good.png"))
    truncated = tmp_path / "truncated.png"
    data = _png(size=(64, 64), noise=True)
    truncated.write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    rows = [
        {"img_path": good, "prompt": "Q?", "chosen": "A.", "rejected": "B."},
        {"img_path": str(tmp_path / "missing.png"), "prompt": "Q?", "chosen": "A.", "rejected": "B."},
        {"img_path": good, "prompt": "Q?", "chosen": "   ", "rejected": "B."},
        {"img_path": str(truncated), "prompt": "Q?", "chosen": "A.", "rejected": "B."},
        {"img_path": good, "prompt": "", "chosen": "A.", "rejected": "B."},
        {"img_path": good, "prompt": "Q?", "chosen": "A."},
        {"img_path": str(tmp_path / "text.png"), "prompt": "Q?", "chosen": "A.", "rejected": "B."},
        {"img_path": None, "prompt": "Q?", "chosen": "A.", "rejected": "B."},
        {"img_path": good, "prompt": "Q?", "chosen": 3, "rejected": "B."},
        ["not", "an", "object"],
        {"text": "unknown format"},
    ]
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with path.open("a") as f:
        f.write("{broken json\n")
    records, problems = load_records(path)
    assert [r.index for r in records] == [0]
    expected = [
        (1, "image file not found"), (2, "chosen is empty"), (3, "image cannot be read"), (4, "prompt is empty"),
        (5, "missing field 'rejected'"), (6, "image cannot be decoded"), (7, "missing image"),
        (8, "chosen must be a string"), (9, "record must be an object"), (10, "unknown record format"),
        (11, "not valid JSON"),
    ]
    assert len(problems) == len(expected)
    for line, (index, reason) in zip(problems, expected, strict=True):
        assert line.startswith(f"{path} record {index}: "), line
        assert reason in line, line


def test_prompt_that_would_lose_image_tokens_is_refused(tmp_path, tiny_processor):
    img = _png(tmp_path / "a.png")
    rows = [{"img_path": str(img), "prompt": "What colour is it?", "chosen": "Red.", "rejected": "Blue."}]
    records, _ = load_records(_jsonl(tmp_path / "d.jsonl", rows))
    # the tiny model's prompt holds 16 image tokens plus the template and question
    examples, problems, _ = build_examples(records, tiny_processor, max_length=20, source="d.jsonl")
    assert examples == []
    assert problems[0].startswith("d.jsonl record 0: prompt takes")
    assert "16 of them image tokens" in problems[0] and "max_length=20" in problems[0]


def test_answers_truncated_to_fit(tmp_path, tiny_processor):
    img = _png(tmp_path / "a.png")
    long = "red " * 50
    rows = [{"img_path": str(img), "prompt": "Q?", "chosen": long, "rejected": "Blue."}]
    records, _ = load_records(_jsonl(tmp_path / "d.jsonl", rows))
    (ex,), problems, n_truncated = build_examples(records, tiny_processor, max_length=40)
    assert problems == [] and n_truncated == 1
    assert len(ex.prompt_ids) + len(ex.chosen_ids) == 40
    assert list(ex.rejected_ids) == tiny_processor.tokenizer(" Blue.</s>", add_special_tokens=False)["input_ids"]


def test_prepare_dataset_stops_or_skips(tmp_path, tiny_processor):
    good = str(_png(tmp_path / "a.png", size=(40, 40), noise=True))
    rows = [
        {"img_path": good, "prompt": "Q?", "chosen": "A.", "rejected": "B."},
        {"img_path": str(tmp_path / "gone.png"), "prompt": "Q?", "chosen": "A.", "rejected": "B."},
        {"img_path": good, "prompt": "Q?", "chosen": "A.", "rejected": ""},
    ]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    args = parse_config([], {"output_dir": str(tmp_path / "out"), "dataset": str(path), "max_length": 64,
                             "corruption_seed": 0, "dataset_num_proc": 1})
    with pytest.raises(DataError) as err:
        prepare_dataset(args, tiny_processor)
    assert len(err.value.problems) == 2
    args.skip_bad_records = True
    dataset = prepare_dataset(args, tiny_processor)
    assert len(dataset) == 1 and dataset.num_skipped == 2
    item = dataset[0]
    assert item["image"]["pixel_values"].shape == item["corrupted_image"]["pixel_values"].shape == (1, 3, 32, 32)
    assert not item["image"]["pixel_values"].equal(item["corrupted_image"]["pixel_values"])


def test_trl_messages_with_null_text_parts_load(tmp_path):
    # datasets stores every content part with every key: image parts carry text=None
    rows = [{"images": [_png()], "prompt": [{"role": "user", "content": [
        {"type": "image", "text": None}, {"type": "text", "text": "Colour?"}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Red."}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]}]
    (r,), problems = load_records("rows", rows=rows)
    assert problems == [] and r.chosen == "Red."
