"""A deterministic synthetic preference set, made in code: coloured shapes at places in a small image.

The chosen answer describes the image; the rejected one gets one colour, shape or place wrong, so
only a model that looks at the image can tell them apart.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from mdpo_fast.records import Record, parse_record

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square", "triangle")
PLACES = ("top left", "top right", "bottom left", "bottom right")
PROMPTS = ("Describe the image.", "What shapes do you see?", "Which shapes are in the picture, and where?")


def _draw(canvas: ImageDraw.ImageDraw, shape: str, place: str, colour: str, size: int) -> None:
    half = size // 2
    col, row = PLACES.index(place) % 2, PLACES.index(place) // 2
    pad = max(1, size // 16)
    box = (col * half + pad, row * half + pad, (col + 1) * half - pad - 1, (row + 1) * half - pad - 1)
    fill = COLOURS[colour]
    if shape == "circle":
        canvas.ellipse(box, fill=fill)
    elif shape == "square":
        canvas.rectangle(box, fill=fill)
    else:
        canvas.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)


def _describe(objects) -> str:
    parts = [f"a {colour} {shape} at the {place}" for shape, place, colour in objects]
    text = " and ".join(parts) + "."
    return text[0].upper() + text[1:]


def demo_rows(n: int = 256, seed: int = 0, size: int = 32) -> list[dict]:
    """`n` rows in the RLAIF-V layout (`image` as a PIL image, `question`, `chosen`, `rejected`)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        places = rng.sample(PLACES, 2)
        objects = [(rng.choice(SHAPES), place, rng.choice(list(COLOURS))) for place in places]
        image = Image.new("RGB", (size, size), (245, 245, 245))
        canvas = ImageDraw.Draw(image)
        for shape, place, colour in objects:
            _draw(canvas, shape, place, colour, size)
        wrong = [list(o) for o in objects]
        which, attribute = rng.randrange(2), rng.randrange(3)
        options = (SHAPES, [p for p in PLACES if p not in places], list(COLOURS))[attribute]
        wrong[which][attribute] = rng.choice([v for v in options if v != wrong[which][attribute]])
        rows.append({
            "image": image, "question": rng.choice(PROMPTS),
            "chosen": _describe(objects), "rejected": _describe(wrong),
        })
    return rows


def demo_records(n: int = 256, seed: int = 0, size: int = 32) -> list[Record]:
    return [parse_record(row, i) for i, row in enumerate(demo_rows(n, seed, size))]


def write_demo_data(directory: str | Path, n: int = 256, seed: int = 0, size: int = 32) -> Path:
    """Write the set as `train.jsonl` (mDPO layout: img_path, prompt, chosen, rejected) plus PNG images."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    path = directory / "train.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i, row in enumerate(demo_rows(n, seed, size)):
            name = f"images/{i:05d}.png"
            row["image"].save(directory / name)
            record = {"img_path": name, "prompt": row["question"], "chosen": row["chosen"], "rejected": row["rejected"]}
            f.write(json.dumps(record) + "\n")
    return path
