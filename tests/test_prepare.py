"""Preparation at scale: worker processes give what one process gives, the cache serves re-runs and rebuilds when
anything it depends on changes, and no image bytes stay in memory."""

import io
import logging

import pytest
from PIL import Image

from mdpo_fast.cli import parse_config
from mdpo_fast.data import cache_file, prepare_dataset
from mdpo_fast.examples import build_examples
from mdpo_fast.records import ArrowImage, DataError, check_image, load_image, load_records


def _dataset(tmp_path, n=12, bad=(3, 7)):
    """A `save_to_disk` set in RLAIF-V's layout with images of several sizes; records in `bad` hold broken images."""
    datasets = pytest.importorskip("datasets")

    def image(i):
        buf = io.BytesIO()
        Image.new("RGB", (24 + 8 * (i % 3), 16 + 8 * (i % 2)), (40 * i % 255, 90, 160)).save(buf, format="PNG")
        data = buf.getvalue()
        return {"bytes": data[: len(data) // 2] if i in bad else data, "path": None}  # truncated when bad

    rows = {"image": [image(i) for i in range(n)], "question": [f"What is {i}?" for i in range(n)],
            "chosen": [f"It is {i}." for i in range(n)], "rejected": [f"It is not {i}." for i in range(n)]}
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "chosen": datasets.Value("string"), "rejected": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    return tmp_path / "ds"


def _args(tmp_path, **values):
    return parse_config([], {"output_dir": str(tmp_path / "out"), "use_cpu": True, "report_to": "none",
                             "max_length": 128, "skip_bad_records": True, **values})


def test_workers_give_what_one_process_gives(tmp_path, tiny_processor, monkeypatch):
    from mdpo_fast import examples as examples_module

    records, problems = load_records(_dataset(tmp_path), check_images=False)
    assert problems == [] and all(isinstance(r.image, ArrowImage) for r in records)  # no bytes in the records
    serial = build_examples(records, tiny_processor, max_length=128, source="ds")
    monkeypatch.setattr(examples_module, "WINDOW", 5)  # the workers get the stream in windows of 5, 5 and 2
    parallel = build_examples(iter(records), tiny_processor, max_length=128, source="ds", num_proc=2,
                              min_parallel=0)
    assert parallel == serial
    examples, problems, _ = parallel
    assert [p.split(":")[0] for p in problems] == ["ds record 3", "ds record 7"]  # the one decode finds them
    assert "image cannot be read" in problems[0]
    assert [ex.index for ex in examples] == [i for i in range(12) if i not in (3, 7)]
    assert all(isinstance(ex.image, ArrowImage) for ex in examples)


def test_the_cache_serves_reruns_and_rebuilds_on_change(tmp_path, tiny_processor, caplog, monkeypatch):
    data = _dataset(tmp_path, bad=())
    args = _args(tmp_path, dataset=str(data))
    with caplog.at_level(logging.INFO, logger="mdpo_fast"):
        first = prepare_dataset(args, tiny_processor)
    assert cache_file(args, tiny_processor).exists() and "cached" not in caplog.text
    import mdpo_fast.data as data_module

    monkeypatch.setattr(data_module, "build_examples", lambda *a, **k: pytest.fail("prepared again"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mdpo_fast"):
        again = prepare_dataset(args, tiny_processor)
    assert "cached" in caplog.text and list(again.examples) == list(first.examples) and len(again) == 12
    monkeypatch.undo()
    # anything the examples depend on is in the key
    keys = {cache_file(args, tiny_processor)}
    keys.add(cache_file(_args(tmp_path, dataset=str(data), max_length=100), tiny_processor))
    tiny_processor.chat_template, template = tiny_processor.chat_template + " ", tiny_processor.chat_template
    keys.add(cache_file(args, tiny_processor))
    tiny_processor.chat_template = template
    (data / "extra.txt").write_text("new file in the data set")
    keys.add(cache_file(args, tiny_processor))
    assert len(keys) == 4


def test_training_reads_the_cached_examples_mapped_not_copied(tmp_path, tiny_processor, monkeypatch):
    """What training holds is the mapped Arrow file, written as preparation goes (in record batches, here of 5):
    the same examples, record lookups, and a pickle (what a spawned loader worker receives) that is the file's
    path, not the examples."""
    import pickle

    import pyarrow as pa

    from mdpo_fast import example_table
    from mdpo_fast.example_table import ExampleTable

    monkeypatch.setattr(example_table, "BATCH", 5)

    data = _dataset(tmp_path, bad=())
    args = _args(tmp_path, dataset=str(data))
    records, _ = load_records(data, check_images=False)
    want, _, _ = build_examples(records, tiny_processor, max_length=128)
    dataset = prepare_dataset(args, tiny_processor)  # the first run already trains from the mapped file
    assert isinstance(dataset.examples, ExampleTable) and list(dataset.examples) == want
    assert pa.ipc.open_file(str(dataset.examples.path)).num_record_batches == 3  # streamed, BATCH at a time
    assert dataset.examples[-1] == want[-1] and dataset.examples[2:4] == want[2:4]
    assert [dataset.row_of(ex.index) for ex in want] == list(range(len(want)))
    with pytest.raises(KeyError):
        dataset.row_of(1000)
    sent = pickle.dumps(dataset.examples)
    assert len(sent) < 1000 and list(pickle.loads(sent)) == want


def test_a_set_with_bad_records_is_checked_again_each_run(tmp_path, tiny_processor):
    """Users fix bad images in place, under the same names: such a set is never served from the cache."""
    data = _dataset(tmp_path)
    args = _args(tmp_path, dataset=str(data))
    assert prepare_dataset(args, tiny_processor).num_skipped == 2
    assert not cache_file(args, tiny_processor).exists()
    with pytest.raises(DataError, match="record 3: image cannot be read"):
        prepare_dataset(_args(tmp_path, dataset=str(data), skip_bad_records=False), tiny_processor)


def test_records_in_memory_are_not_cached(tmp_path, tiny_processor):
    from mdpo_fast.demo_data import demo_records

    assert cache_file(_args(tmp_path), tiny_processor) is None  # no --dataset: nothing on disk to key on
    dataset = prepare_dataset(_args(tmp_path), tiny_processor, records=demo_records(n=3), source="demo")
    assert len(dataset) == 3


def test_image_only_processors_reach_worker_processes_intact():
    """Processors built without their video processor pickle as their base class and state (spawned workers)."""
    import pickle

    from mdpo_fast.demo_data import demo_records
    from mdpo_fast.examples import tokenize_record
    from mdpo_fast.tiny import build_processor

    processor = build_processor("qwen2_vl")
    copy = pickle.loads(pickle.dumps(processor))
    assert type(copy) is type(processor) and "video_processor" not in type(copy).get_attributes()
    record = demo_records(n=1)[0]
    assert tokenize_record(record, copy, 256) == tokenize_record(record, processor, 256)


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3", "llava_next"])
def test_one_image_processing_per_size_gives_the_same_token_ids(family):
    """Preparation runs the pixel pipeline once per image size: the ids equal the processor's on every image."""
    import dataclasses

    from mdpo_fast.demo_data import demo_records
    from mdpo_fast.examples import tokenize_record
    from mdpo_fast.tiny import build_processor

    processor = build_processor(family)
    sizes = [(56, 112), (112, 56), (56, 112), (84, 84), (112, 56), (84, 84)]  # each size twice
    records = [dataclasses.replace(r, image=r.image.resize(sizes[i])) for i, r in enumerate(demo_records(n=6))]
    examples, problems, _ = build_examples(records, processor, max_length=512)
    assert problems == [] and type(processor.image_processor).__name__ != "SameSizeOutputs"  # restored
    assert examples == [tokenize_record(r, processor, 512)[0] for r in records]
    for ex, record in zip(examples, records, strict=True):  # the plain processor on every real image
        want = processor(text=ex.prompt_text, images=load_image(record.image), return_tensors="pt")["input_ids"][0]
        assert list(ex.prompt_ids) == want.tolist()
    assert len({len(ex.prompt_ids) for ex in examples}) > 1  # the sizes do change the prompts


def _photo_jpeg(width=96, height=72, progressive=False) -> bytes:
    import numpy as np

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(
        buf, format="JPEG", quality=85, progressive=progressive)
    return buf.getvalue()


@pytest.mark.parametrize("progressive", [False, True])
def test_the_cheap_jpeg_check_fails_exactly_where_a_full_decode_fails(progressive):
    """`check_image` decodes JPEGs at 1/8 scale: it must reject every truncation and corruption that the full
    decode of training rejects, and accept every one it accepts."""
    import numpy as np

    data = _photo_jpeg(progressive=progressive)
    assert check_image(data) == (96, 72) == load_image(data).size
    rng = np.random.default_rng(1)
    cases = [data[:n] for n in range(100, len(data), 97)]  # truncated
    for _ in range(40):  # bytes overwritten anywhere, headers included
        broken = bytearray(data)
        for at in rng.integers(2, len(data), 3):
            broken[at] = int(rng.integers(0, 256))
        cases.append(bytes(broken))
    outcomes = set()
    for case in cases:
        try:
            load_image(case)
            full = None
        except Exception as e:  # noqa: BLE001 - whatever the full decode raises, the check must raise too
            full = type(e)
        try:
            check_image(case)
            cheap = None
        except Exception as e:  # noqa: BLE001
            cheap = type(e)
        assert (full is None) == (cheap is None), (len(case), full, cheap)
        outcomes.add(full is None)
    assert outcomes == {True, False}  # both kinds of case were met


def test_hub_datasets_are_cached_by_their_downloaded_files(tmp_path, tiny_processor, monkeypatch):
    """A hub id has no local path: its identity is the Arrow files `load_dataset` downloaded it into."""
    datasets = pytest.importorskip("datasets")
    from mdpo_fast import records as records_module

    revisions = [datasets.load_from_disk(str(_dataset(tmp_path / name, bad=()))) for name in ("v1", "v2")]
    calls = []

    def load_dataset(source, split):
        calls.append((source, split))
        return revisions[0]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    records_module.hf_dataset.cache_clear()
    args = _args(tmp_path, dataset="someone/rlaif-v-like")
    first = prepare_dataset(args, tiny_processor)
    assert calls == [("someone/rlaif-v-like", "train")]  # opened once for both the key and the rows
    key = cache_file(args, tiny_processor)
    assert key.exists() and list(prepare_dataset(args, tiny_processor).examples) == list(first.examples)
    revisions.reverse()  # the hub id now resolves to new files (a new revision): a new key
    records_module.hf_dataset.cache_clear()
    assert cache_file(args, tiny_processor) not in (None, key)
    records_module.hf_dataset.cache_clear()
