"""Malformed records from anywhere: every one ends in a clear problem line or a counted skip, never a traceback."""

import io
import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mdpo_fast.examples import build_examples
from mdpo_fast.records import load_records


def _image_bytes(size, mode, fmt):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


IMAGES = st.sampled_from([
    ("png-rgb", _image_bytes((8, 8), "RGB", "PNG")),
    ("png-1x1", _image_bytes((1, 1), "RGB", "PNG")),
    ("png-palette", _image_bytes((5, 3), "P", "PNG")),
    ("png-gray16", _image_bytes((4, 4), "I;16", "PNG")),
    ("png-la", _image_bytes((4, 6), "LA", "PNG")),
    ("jpeg-cmyk", _image_bytes((7, 7), "CMYK", "JPEG")),
    ("truncated", _image_bytes((64, 64), "RGB", "PNG")[:300]),
    ("garbage", b"\x89PNG not really"),
    ("empty", b""),
])
TEXT = st.one_of(st.text(max_size=40), st.just(""), st.just("   "), st.text(min_size=2000, max_size=3000),
                 st.integers(), st.none(), st.lists(st.text(max_size=5), max_size=3),
                 st.just([{"role": "assistant", "content": None}]), st.just([{"role": "user"}]),
                 st.just([{"content": [{"type": "text", "text": "hi"}, "not a dict"]}]))
FORMATS = [("img_path", "prompt"), ("images", "prompt"), ("image", "question"), ("image", "prompt")]
BAD_IMAGE_REFS = st.sampled_from([[], {"path": None}, {"bytes": b""}, 5, None, "missing.png", ""])


@st.composite
def rows(draw):
    """A valid record in one of the formats, then up to two of its fields dropped or replaced by junk."""
    image_field, prompt_field = draw(st.sampled_from(FORMATS))
    _, data = draw(IMAGES)
    row = {image_field: [data] if image_field == "images" else data, prompt_field: "What is in the picture?",
           "chosen": "A red dot at the top.", "rejected": "A blue dot at the bottom."}
    for field in draw(st.lists(st.sampled_from(list(row)), max_size=2, unique=True)):
        if draw(st.booleans()):
            del row[field]
        else:
            row[field] = draw(BAD_IMAGE_REFS if field == image_field else TEXT)
    return draw(st.sampled_from([row] * 8 + [5, "not a record", None]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(rows(), min_size=1, max_size=6))
def test_every_record_is_loaded_or_named(tmp_path_factory, tiny_processor, batch):
    try:
        text = "".join(json.dumps(row) + "\n" for row in batch)
    except TypeError:  # image bytes are not JSON: such rows come from datasets, in memory
        text = None
    if text is not None:
        path = tmp_path_factory.mktemp("d") / "data.jsonl"
        path.write_text(text)
        records, problems = load_records(path)
    else:
        records, problems = load_records("rows", rows=batch)
    assert len(records) + len(problems) == len(batch)
    for line in problems:
        assert " record " in line and line.split(": ", 1)[1].strip(), line  # names the record and the problem
    examples, bad, _ = build_examples(records, tiny_processor, max_length=64, source="data")
    assert len(examples) + len(bad) == len(records)
    for line in bad:
        assert line.startswith("data record "), line


def test_odd_but_valid_images_load(tiny_processor):
    rows = [{"image": _image_bytes(size, mode, fmt), "question": "What is it?", "chosen": "A.", "rejected": "B."}
            for size, mode, fmt in [((1, 1), "RGB", "PNG"), ((5, 3), "P", "PNG"), ((4, 4), "I;16", "PNG"),
                                    ((4, 6), "LA", "PNG"), ((7, 7), "CMYK", "JPEG"), ((3, 200), "L", "PNG")]]
    records, problems = load_records("rows", rows=rows)
    assert problems == [] and len(records) == 6
    examples, bad, _ = build_examples(records, tiny_processor, max_length=64)
    assert bad == [] and len(examples) == 6
