"""Layer 1: preference records from JSON / JSONL files or Hugging Face datasets, validated into one type.

Formats (docs/DESIGN.md, "Layers"): mDPO `img_path, prompt, chosen, rejected`; TRL `images, prompt, chosen,
rejected` (plain strings or conversational messages); RLAIF-V `image, question, chosen, rejected`.
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_TOKEN = "<image>"


class DataError(ValueError):
    """Bad input data; `problems` holds one line per bad record, each naming the source and record index."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Record:
    """One preference pair. `prompt` is a list of chat messages whose user turn holds one image."""

    index: int  # position in the source, stable across skips: the corruption is keyed on it
    image: Any  # path, bytes, PIL image or ArrowImage; decoded only when needed
    prompt: tuple
    chosen: str
    rejected: str


@dataclass(frozen=True)
class ArrowImage:
    """An image inside a Hugging Face dataset's Arrow files (`save_to_disk` or the hub cache), read from the
    memory-mapped files when needed, so neither the records nor the examples hold image bytes."""

    files: tuple[str, ...]
    row: int
    column: str

    def read(self) -> bytes:
        return _image_ref(_arrow_table(self.files).column(self.column)[self.row].as_py(), None)


@functools.lru_cache(maxsize=4)
def _arrow_table(files: tuple[str, ...]):
    """The Arrow table of a dataset's files, memory-mapped (nothing read until a row is)."""
    import datasets
    import pyarrow as pa

    return pa.concat_tables([datasets.Dataset.from_file(f).data.table for f in files])


def _open(ref: Any) -> Image.Image:
    """The image behind a reference, its header read, its pixels not yet decoded."""
    if isinstance(ref, ArrowImage):
        ref = ref.read()
    if isinstance(ref, Image.Image):
        return ref
    return Image.open(io.BytesIO(ref) if isinstance(ref, (bytes, bytearray)) else ref)


def load_image(ref: Any) -> Image.Image:
    """Decode an image reference fully (truncated files fail here, not mid-training) as RGB (`to_rgb`)."""
    image = _open(ref)
    image.load()
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image has no pixels ({image.width}x{image.height})")
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the pixels mean it: 16-bit gray scaled to 8 bits (Pillow's own conversion clips it to white),
    transparency composited on white (as transformers' processors do), every other mode through Pillow."""
    if image.mode.startswith("I"):  # I;16 (16-bit PNG, TIFF) and I (32-bit ints holding 16-bit values)
        values = np.asarray(image, dtype=np.float64)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"{image.mode} image with values outside 0..65535 cannot be shown in 8 bits")
        gray = Image.fromarray(np.round(values / 257).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if image.mode == "F":
        raise ValueError("floating-point (mode F) images have no defined 8-bit range: convert them to 8-bit first")
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def check_image(ref: Any) -> tuple[int, int]:
    """Prove that `load_image(ref)` will succeed, at half its cost for JPEG, and return the image's size. A JPEG is
    decoded at 1/8 scale (draft mode): every byte of its compressed data is still entropy-decoded, which is where
    truncation and corruption fail, only the inverse transform is cut short. Other formats decode in full."""
    image = _open(ref)
    size = image.size
    if image.format == "JPEG" and not isinstance(ref, Image.Image):
        if size[0] < 1 or size[1] < 1:
            raise ValueError(f"image has no pixels ({size[0]}x{size[1]})")
        image.draft(None, (max(1, size[0] // 8), max(1, size[1] // 8)))
        image.load()
        return size
    return load_image(image).size


def _image_ref(value: Any, image_root: Path | None) -> Any:
    if isinstance(value, (list, tuple)):  # TRL keeps a list of images
        if len(value) != 1:
            raise ValueError(f"expected exactly one image, got {len(value)}")
        value = value[0]
    if isinstance(value, dict):  # datasets' Image feature without decoding: {"bytes", "path"}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("image path is empty")
        path = Path(value)
        if image_root is not None and not path.is_absolute():
            path = image_root / path
            if not path.resolve().is_relative_to(image_root.resolve()):  # absolute paths: the user's explicit choice
                raise ValueError(f"image path {value!r} leads out of --image_root {image_root}")
        if not path.is_file():
            raise ValueError(f"image file not found: {path}")
        return str(path)
    if isinstance(value, (bytes, bytearray, Image.Image, ArrowImage)):
        return value
    raise ValueError(f"image must be a path, bytes or PIL image, got {type(value).__name__}")


def _text(value: Any, field: str) -> str:
    """A plain string, or the text of chat message(s) (TRL's conversational answers)."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        parts = []
        for message in value:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(c.get("text") or "" for c in content if isinstance(c, dict) and c.get("type") == "text")
            else:
                raise ValueError(f"{field}: messages must have a 'content' string or list")
        value = "".join(parts)
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{field} is empty")
    return value


def _prompt_messages(value: Any) -> tuple:
    """Chat messages with one image placeholder, first in the first user turn unless already placed."""
    if isinstance(value, str):
        text = value.replace(IMAGE_TOKEN, "").strip()
        if not text:
            raise ValueError("prompt is empty")
        return ({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]},)
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) and "role" in m for m in value):
        raise ValueError(f"prompt must be a string or a list of chat messages, got {type(value).__name__}")
    messages = []
    for m in value:
        content = m.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise ValueError("prompt: message content must be a string or a list")
        messages.append({"role": m["role"], "content": list(content)})
    n_images = sum(c.get("type") == "image" for m in messages for c in m["content"] if isinstance(c, dict))
    if n_images > 1:
        raise ValueError(f"prompt has {n_images} image placeholders; one image per record is supported")
    texts = [c.get("text") for m in messages for c in m["content"] if isinstance(c, dict)]
    if not any(isinstance(t, str) and t.strip() for t in texts):  # datasets stores text=None on image parts
        raise ValueError("prompt is empty")
    if n_images == 0:
        user = next((m for m in messages if m["role"] == "user"), None)
        if user is None:
            raise ValueError("prompt has no user message to hold the image")
        user["content"].insert(0, {"type": "image"})
    return tuple(messages)


# (image field, prompt field) of each known format; chosen / rejected are shared.
_FORMATS = (("img_path", "prompt"), ("images", "prompt"), ("image", "question"), ("image", "prompt"))


def parse_record(row: Any, index: int, image_root: Path | None = None) -> Record:
    """One raw row into a `Record`; raises ValueError saying which field is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"record must be an object, got {type(row).__name__}")
    fmt = next((f for f in _FORMATS if f[0] in row and f[1] in row), None)
    if fmt is None:
        missing = [k for k in ("image", "prompt", "chosen", "rejected") if k not in row]
        raise ValueError(
            f"unknown record format (fields {sorted(row)}); expected "
            f"{', '.join('/'.join(f) for f in _FORMATS)} with chosen and rejected; missing {missing}"
        )
    for key in ("chosen", "rejected"):
        if key not in row:
            raise ValueError(f"missing field '{key}'")
    image_field, prompt_field = fmt
    if row[image_field] is None:
        raise ValueError(f"missing image ('{image_field}' is null)")
    return Record(
        index=index,
        image=_image_ref(row[image_field], image_root),
        prompt=_prompt_messages(row[prompt_field]),
        chosen=_text(row["chosen"], "chosen"),
        rejected=_text(row["rejected"], "rejected"),
    )


def read_rows(source: str | Path, split: str = "train"):
    """Rows of a .json / .jsonl file, a dataset saved with `save_to_disk`, or a hub dataset id."""
    path = Path(source)
    if path.is_file() and path.suffix == ".jsonl":
        with path.open("rb") as f:  # decoded line by line: one bad line is one bad record
            for lineno, raw in enumerate(f, 1):
                if raw.strip():
                    try:
                        yield json.loads(raw.decode("utf-8"))
                    except UnicodeDecodeError as e:
                        yield ValueError(f"line {lineno} is not valid UTF-8 (byte {e.start + 1}: {e.reason})")
                    except json.JSONDecodeError as e:
                        yield ValueError(f"line {lineno} is not valid JSON: {e.msg}")
        return
    if path.is_file():
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError([f"{source}: not valid UTF-8 (byte {e.start + 1}: {e.reason})"]) from None
        except json.JSONDecodeError as e:
            raise DataError([f"{source}: not valid JSON ({e.msg}, line {e.lineno})"]) from None
        if not isinstance(data, list):
            raise DataError([f"{source}: expected a JSON list of records, got {type(data).__name__}"])
        yield from data
        return
    yield from _read_hf_dataset(source, split)


@functools.lru_cache(maxsize=2)
def hf_dataset(source: str, split: str):
    """A `save_to_disk` folder, a data folder or a hub dataset id as one memory-mapped split (opened once a run:
    the preparation cache reads its files' identity, preparation its rows)."""
    import datasets

    path = Path(source)
    if path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(str(path))
    elif path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
        raise DataError([f"{source}: the folder holds no data files"])
    elif path.exists() or looks_like_hub_id(source):
        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as e:  # noqa: BLE001 - the hub's and the loaders' many errors: one line, named
            where = "the folder" if path.exists() else "the Hugging Face hub"
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise DataError([f"{source}: cannot load from {where} ({type(e).__name__}: {first})"]) from None
    else:
        raise DataError([f"{source}: no such file or directory"])
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError([f"{source}: no split {split!r} (it has {', '.join(ds)}); pass --dataset_split"])
        ds = ds[split]
    return ds


def looks_like_hub_id(source: str) -> bool:
    """`owner/name` and nothing local: no file suffix, no path syntax, and its first part is no local folder (so
    `data/trian.jsonl` or `data/trian`, a typo, is "no such file" at once, not a wait on the network)."""
    parts = source.split("/")
    return (len(parts) == 2 and all(parts) and not source.startswith((".", "~")) and not Path(parts[0]).exists()
            and Path(source).suffix.lower() not in (".json", ".jsonl", ".parquet", ".csv", ".arrow", ".txt"))


def _read_hf_dataset(source: str | Path, split: str):
    import datasets

    ds = hf_dataset(str(source), split)
    columns = [c for c in ("image", "images") if c in ds.column_names]
    files = tuple(f["filename"] for f in ds.cache_files)
    if columns and files and ds._indices is None:  # images stay in the memory-mapped files, referenced by row
        for row, record in enumerate(ds.remove_columns(columns)):
            yield {**record, **{c: ArrowImage(files, row, c) for c in columns}}
        return
    for column in ("image", "images"):  # keep images compressed; decode one at a time when used
        feature = ds.features.get(column)
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(column, datasets.Image(decode=False))
        elif isinstance(getattr(feature, "feature", None), datasets.Image):
            ds = ds.cast_column(column, datasets.List(datasets.Image(decode=False)))
    yield from ds


def load_records(
    source: str | Path, *, image_root: str | Path | None = None, split: str = "train", check_images: bool = True,
    rows=None,
) -> tuple[list[Record], list[str]]:
    """Read and validate every record. Returns `(records, problems)`, one problem line per bad record.

    `rows`: records already in memory (dicts), named `source` in problem lines; otherwise `source` is read.
    With `check_images`, every image is decoded once here, so a missing or broken file is reported
    before training starts rather than at step N.
    """
    problems: list[str] = []
    records = list(iter_records(source, problems, image_root=image_root, split=split, check_images=check_images,
                                rows=rows))
    if not records and not problems:
        problems.append(f"{source}: no records")
    return records, problems


def iter_records(
    source: str | Path, problems: list[str], *, image_root: str | Path | None = None, split: str = "train",
    check_images: bool = False, rows=None,
):
    """`load_records` as a stream: records one at a time, each bad one's problem line appended to `problems`."""
    root = Path(image_root) if image_root is not None else None
    for index, row in enumerate(read_rows(source, split) if rows is None else rows):
        try:
            if isinstance(row, Exception):
                raise row
            record = parse_record(row, index, root)
            if check_images:
                load_image(record.image)
        except RECORD_ERRORS as e:
            problems.append(f"{source} record {index}: {problem_line(e)}")
            continue
        yield record


def count_rows(source: str | Path, split: str = "train") -> int | None:
    """How many rows `read_rows` will give, where that is cheap to know (datasets, JSONL lines), else None."""
    path = Path(source)
    if path.is_file() and path.suffix == ".jsonl":
        with path.open("rb") as f:
            return sum(1 for line in f if line.strip())
    return None if path.is_file() else len(hf_dataset(str(source), split))


# What a bad record raises while it is read, decoded and tokenized: each is one problem line, never a crash.
RECORD_ERRORS = (ValueError, OSError, UnidentifiedImageError, Image.DecompressionBombError)


def problem_line(e: Exception) -> str:
    """The one-line problem for one of `RECORD_ERRORS`."""
    if isinstance(e, UnidentifiedImageError):
        return "image cannot be decoded (not an image, or an unsupported format)"
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
        return f"image cannot be read: {e}"
    return str(e)

