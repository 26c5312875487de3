"""The corrupted image m' (docs/DESIGN.md, "The corrupted image"): a random resized crop, a pure function of
(seed, example index)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

AREA = (0.01, 0.2)  # fraction of the image area the crop keeps
RATIO = (3 / 4, 4 / 3)  # crop aspect ratio (width / height), drawn log-uniformly


def check_corruption(area, ratio) -> None:
    """Refuse a crop range no crop can have: checked where a run's settings enter (`MDPOConfig`,
    `PreferenceDataset`), not per image."""
    for name, value in (("corruption_area", area), ("corruption_ratio", ratio)):
        if len(value) != 2 or not 0 < value[0] <= value[1]:
            raise ValueError(f"{name} must be two numbers 0 < low <= high, got {tuple(value)}")
    if area[1] > 1:
        raise ValueError(f"corruption_area must lie in (0, 1], got {tuple(area)}")


def corruption_box(
    width: int, height: int, seed: int, index: int, area=AREA, ratio=RATIO
) -> tuple[int, int, int, int]:
    """`(left, top, crop_width, crop_height)` of the crop for example `index` under `seed` (`area` and `ratio` as
    `check_corruption` accepts them)."""
    rng = np.random.default_rng([seed, index])
    total = width * height
    for _ in range(10):
        target = total * rng.uniform(*area)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            break
    else:  # very elongated image: keep the area, give up the aspect ratio
        h = min(height, max(1, h))
        w = min(width, max(1, round(target / h)))
    left = int(rng.integers(0, width - w + 1))
    top = int(rng.integers(0, height - h + 1))
    return left, top, w, h


def corrupt_image(image: Image.Image, seed: int, index: int, area=AREA, ratio=RATIO) -> Image.Image:
    """Crop a small random region and resize it back to the original size, so m and m' give the same
    number of image tokens in every model family."""
    left, top, w, h = corruption_box(image.width, image.height, seed, index, area, ratio)
    return image.crop((left, top, left + w, top + h)).resize(image.size, Image.Resampling.BILINEAR)
