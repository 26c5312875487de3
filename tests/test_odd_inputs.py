"""Odd inputs and broken checkpoints through `mdpo-fast train`: each ends in one `mdpo-fast: error:` line that names
what is wrong, with a non-zero exit, before the model loads wherever it can; odd but valid images keep their
pixels."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mdpo_fast import cli
from mdpo_fast.records import load_image

FAST = ["--lora_r", "4", "--lora_alpha", "8", "--use_cpu", "true", "--disable_tqdm", "true", "--max_length", "128",
        "--report_to", "none", "--per_device_train_batch_size", "4", "--dataloader_num_workers", "0"]


def _train(capsys, tiny_dir, *flags):
    code = cli.main(["train", "--model_name_or_path", str(tiny_dir), *FAST, *flags])
    return code, capsys.readouterr().err


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("mdpo-fast: error:")]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the model's weights are loaded: these errors must come first."""
    import mdpo_fast.modeling as modeling

    monkeypatch.setattr(modeling, "load_model", lambda args: pytest.fail("the model was loaded"))


# 1. Images: every mode converts faithfully or is refused.
def _photo(mode: str) -> Image.Image:
    ramp = np.linspace(0, 1, 48 * 32).reshape(32, 48)
    if mode == "I;16":
        return Image.fromarray((ramp * 65535).astype(np.uint16))
    rgb = Image.fromarray((np.stack([ramp, ramp[::-1], ramp.T[:32, :32].repeat(2, 1)[:, :48]], -1) * 255)
                          .astype(np.uint8))
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", ["I;16", "L", "1", "P", "CMYK", "YCbCr", "RGBA", "LA", "P+tRNS", "I", "F"])
def test_every_image_mode_converts_faithfully_or_is_refused(mode):
    source = _photo("I;16" if mode in ("I", "F") else mode.removesuffix("+tRNS"))
    if mode in ("I", "F"):
        source = source.convert(mode)
    extra = {}
    if mode in ("RGBA", "LA"):  # the left half transparent: composited on white, as processors do
        alpha = np.full((32, 48), 255, np.uint8)
        alpha[:, :24] = 0
        bands = list(source.split())
        bands[-1] = Image.fromarray(alpha)
        source = Image.merge(mode, bands)
    if mode == "P+tRNS":  # a palette image whose colour 0 is transparent, on the left half
        indices = np.asarray(source).copy()
        indices[indices == 0] = 1
        indices[:, :24] = 0
        source = Image.fromarray(indices, mode="P")
        source.putpalette(_photo("P").getpalette())
        extra["transparency"] = 0
    buf = io.BytesIO()
    source.save(buf, format="TIFF" if mode in ("F", "I", "CMYK", "YCbCr") else "PNG", **extra)
    if mode == "F":
        with pytest.raises(ValueError, match="floating-point"):
            load_image(buf.getvalue())
        return
    got = np.asarray(load_image(buf.getvalue()), dtype=np.float64)
    assert got.shape == (32, 48, 3)
    if mode in ("I;16", "I"):
        want = np.asarray(source, dtype=np.float64) / 257
        assert abs(got.mean() - want.mean()) < 0.5 and np.abs(got[..., 0] - want).max() <= 1  # not clipped white
    elif mode in ("RGBA", "LA", "P+tRNS"):
        assert (got[:, :24] == 255).all()  # transparent: the white background
        want = np.asarray(source.convert("RGB"), dtype=np.float64)[:, 24:]
        assert np.abs(got[:, 24:] - want).max() <= 1
    else:
        want = np.asarray(source.convert("RGB"), dtype=np.float64)
        assert np.abs(got - want).max() <= 1


def test_a_16_bit_png_trains_on_its_real_grey(tmp_path):
    """The case from the issue: mean 127, not the 254 of a clipped conversion."""
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    assert abs(np.asarray(load_image(str(path))).mean() - 127.5) < 1


# 2, 9, 10. Records.
def _jsonl(tmp_path, demo_dir, lines: list[bytes]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _demo_lines(demo_dir, n=8) -> list[bytes]:
    return (demo_dir / "train.jsonl").read_bytes().splitlines()[:n]


def test_invalid_utf8_is_one_named_line_and_skippable(tmp_path, tiny_dir, demo_dir, capsys, no_model_load):
    lines = _demo_lines(demo_dir)
    lines[2] = lines[2].replace(b"image", b"im\xffage", 1)
    data = _jsonl(tmp_path, demo_dir, lines)
    code, err = _train(capsys, tiny_dir, "--dataset", str(data), "--image_root", str(demo_dir),
                       "--output_dir", str(tmp_path / "o"))
    assert code == 2
    (line,) = _errors(err)
    assert line.startswith(f"mdpo-fast: error: {data} record 2: line 3 is not valid UTF-8 (byte ")
    from mdpo_fast.cli import parse_config
    from mdpo_fast.data import prepare_dataset
    from mdpo_fast.tiny import build_processor

    args = parse_config([], {"output_dir": str(tmp_path / "o"), "dataset": str(data), "image_root": str(demo_dir),
                             "skip_bad_records": True, "max_length": 128})
    dataset = prepare_dataset(args, build_processor())
    assert dataset.num_skipped == 1 and len(dataset) == 7


def test_a_token_the_model_cannot_embed_is_refused_before_the_first_step(tmp_path, demo_dir, capsys):
    """A processor whose tokenizer outgrew the model (added tokens, embeddings not resized): every example holding
    such a token is named, before any step (on a GPU it would be a device-side assert, or a wrong log-prob)."""
    from transformers import AutoProcessor

    from mdpo_fast.tiny import write_tiny_model

    model_dir = write_tiny_model(tmp_path / "model")
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.add_tokens(["<unseen>"])
    processor.save_pretrained(model_dir)
    lines = _demo_lines(demo_dir)
    for k in (2, 5):
        record = json.loads(lines[k])
        record["chosen"] += " <unseen>"
        lines[k] = json.dumps(record).encode()
    data = _jsonl(tmp_path, demo_dir, lines)
    code, err = _train(capsys, model_dir, "--dataset", str(data), "--image_root", str(demo_dir),
                       "--output_dir", str(tmp_path / "o"), "--max_steps", "1")
    errors = _errors(err)
    assert code == 2 and len(errors) == 2, err[-2000:]
    for k, line in zip((2, 5), errors, strict=True):
        assert line.startswith(f"mdpo-fast: error: example {k}: token id ") and "outside the model's vocabulary" in line
    assert not (tmp_path / "o" / "checkpoint-1").exists()


def test_an_image_path_out_of_the_image_root_is_a_bad_record(tmp_path, tiny_dir, demo_dir, capsys, no_model_load):
    root = tmp_path / "root"
    shutil.copytree(demo_dir / "images", root / "images")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    lines = _demo_lines(demo_dir)
    row = json.loads(lines[1])
    row["img_path"] = "../outside.png"
    lines[1] = json.dumps(row).encode()
    data = _jsonl(tmp_path, demo_dir, lines)
    code, err = _train(capsys, tiny_dir, "--dataset", str(data), "--image_root", str(root),
                       "--output_dir", str(tmp_path / "o"))
    assert code == 2
    assert _errors(err) == [f"mdpo-fast: error: {data} record 1: image path '../outside.png' leads out of "
                            f"--image_root {root}"]


def test_same_chosen_and_rejected_are_counted_or_skipped(tmp_path, demo_dir, caplog):
    from mdpo_fast.cli import parse_config
    from mdpo_fast.data import prepare_dataset
    from mdpo_fast.tiny import build_processor

    lines = _demo_lines(demo_dir)
    for i in (1, 4):
        row = json.loads(lines[i])
        row["rejected"] = row["chosen"]
        lines[i] = json.dumps(row).encode()
    data = _jsonl(tmp_path, demo_dir, lines)
    values = {"output_dir": str(tmp_path / "o"), "dataset": str(data), "image_root": str(demo_dir),
              "max_length": 128}
    with caplog.at_level("WARNING", logger="mdpo_fast"):
        assert len(prepare_dataset(parse_config([], values), build_processor())) == 8
        assert "2 examples of" in caplog.text and "same chosen and rejected answer" in caplog.text
        caplog.clear()
        assert len(prepare_dataset(parse_config([], values), build_processor())) == 8  # from the cache: still said
        assert "2 examples of" in caplog.text
    skipped = prepare_dataset(parse_config([], {**values, "skip_bad_records": True}), build_processor())
    assert len(skipped) == 6 and skipped.num_skipped == 2


# 3, 4. Dataset paths.
def test_a_mistyped_dataset_path_is_no_such_file_at_once(tmp_path, tiny_dir, demo_dir, capsys, no_model_load,
                                                         monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("went to the hub"))
    (tmp_path / "data").mkdir()
    for typo in (tmp_path / "data" / "trian.jsonl", tmp_path / "data" / "trian"):
        code, err = _train(capsys, tiny_dir, "--dataset", str(typo), "--output_dir", str(tmp_path / "o"))
        assert (code, _errors(err)) == (2, [f"mdpo-fast: error: {typo}: no such file or directory"])


def test_a_hub_failure_is_one_line(tmp_path, tiny_dir, capsys, no_model_load, monkeypatch):
    import datasets

    def offline(source, split):
        raise ConnectionError(f"Couldn't reach '{source}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    from mdpo_fast.records import hf_dataset

    hf_dataset.cache_clear()
    code, err = _train(capsys, tiny_dir, "--dataset", "someone/no-such-set", "--output_dir", str(tmp_path / "o"))
    assert code == 2
    assert _errors(err) == ["mdpo-fast: error: someone/no-such-set: cannot load from the Hugging Face hub "
                            "(ConnectionError: Couldn't reach 'someone/no-such-set' on the Hub "
                            "(LocalEntryNotFoundError))"]


def test_an_empty_dataset_folder_is_one_line(tmp_path, tiny_dir, capsys, no_model_load):
    (tmp_path / "empty").mkdir()
    code, err = _train(capsys, tiny_dir, "--dataset", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "o"))
    assert (code, _errors(err)) == (2, [f"mdpo-fast: error: {tmp_path / 'empty'}: the folder holds no data files"])


# 8. Output folder.
def test_an_output_dir_that_cannot_be_written_is_refused_first(tmp_path, tiny_dir, demo_dir, capsys, no_model_load,
                                                                monkeypatch):
    import mdpo_fast.data as data

    monkeypatch.setattr(data, "build_examples", lambda *a, **k: pytest.fail("the data was prepared"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    common = ["--dataset", str(demo_dir / "train.jsonl"), "--image_root", str(demo_dir)]
    code, err = _train(capsys, tiny_dir, *common, "--output_dir", str(blocker))
    assert (code, _errors(err)) == (2, [f"mdpo-fast: error: --output_dir {blocker} is a file, not a folder"])
    code, err = _train(capsys, tiny_dir, *common, "--output_dir", str(blocker / "run"))
    assert (code, _errors(err)) == (2, [f"mdpo-fast: error: --output_dir {blocker / 'run'} cannot be created: "
                                        f"{blocker} is not a writable folder"])
    import errno

    import mdpo_fast.checkpoints as checkpoints

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    (tmp_path / "out").mkdir()
    monkeypatch.setattr(checkpoints.tempfile, "NamedTemporaryFile", read_only)  # as on a read-only mount
    code, err = _train(capsys, tiny_dir, *common, "--output_dir", str(tmp_path / "out"))
    assert (code, _errors(err)) == (2, [f"mdpo-fast: error: --output_dir {tmp_path / 'out'} is not writable "
                                        "(Read-only file system)"])


# 5, 6, 7. Checkpoints.
@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dir, demo_dir):
    """A short run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("run") / "out"
    code = cli.main(["train", "--model_name_or_path", str(tiny_dir), *FAST, "--dataset", str(demo_dir / "train.jsonl"),
                     "--image_root", str(demo_dir), "--output_dir", str(out), "--max_steps", "4", "--save_steps", "2"])
    assert code == 0 and (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()
    return out


def _broken_copy(trained, tmp_path, break_it):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    break_it(out / "checkpoint-4")
    return out


@pytest.mark.parametrize("damage, problem", [
    (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    (lambda c: (c / "adapter_model.safetensors").write_bytes((c / "adapter_model.safetensors").read_bytes()[:300]),
     "adapter_model.safetensors cannot be read"),
], ids=["no-optimizer", "no-trainer-state", "truncated-adapter"])
def test_an_incomplete_checkpoint_is_refused_before_the_model_loads(trained, tmp_path, tiny_dir, demo_dir, capsys,
                                                                     no_model_load, damage, problem):
    out = _broken_copy(trained, tmp_path, damage)
    code, err = _train(capsys, tiny_dir, "--dataset", str(demo_dir / "train.jsonl"), "--image_root", str(demo_dir),
                       "--output_dir", str(out), "--max_steps", "6", "--resume_from_checkpoint",
                       str(out / "checkpoint-4"))
    (line,) = _errors(err)
    assert code == 2
    assert line.startswith(f"mdpo-fast: error: checkpoint {out / 'checkpoint-4'} cannot be resumed from: {problem}")


def test_latest_passes_over_an_incomplete_checkpoint_and_says_so(trained, tmp_path, caplog):
    from mdpo_fast.checkpoints import resume_checkpoint

    out = _broken_copy(trained, tmp_path, lambda c: (c / "optimizer.pt").unlink())
    with caplog.at_level("WARNING", logger="mdpo_fast"):
        assert resume_checkpoint("latest", str(out)) == str(out / "checkpoint-2")
    assert f"not resuming from {out / 'checkpoint-4'}: optimizer.pt is missing" in caplog.text
    assert resume_checkpoint("latest", str(trained)) == str(trained / "checkpoint-4")
