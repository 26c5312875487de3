import math
from array import array

import numpy as np
import pytest
from PIL import Image

from mdpo_fast.corruption import AREA, RATIO, check_corruption, corrupt_image, corruption_box
from mdpo_fast.examples import Example, PreferenceDataset
from mdpo_fast.tiny import build_processor


def test_pure_function_of_seed_and_index():
    assert corruption_box(640, 480, 3, 17) == corruption_box(640, 480, 3, 17)
    boxes = {corruption_box(640, 480, 3, i) for i in range(50)}
    assert len(boxes) == 50  # different examples, different crops
    assert corruption_box(640, 480, 4, 17) != corruption_box(640, 480, 3, 17)


def test_area_and_aspect_ranges():
    w, h = 1024, 768  # large enough that rounding to whole pixels is negligible
    boxes = [corruption_box(w, h, 0, i) for i in range(3000)]
    areas = np.array([bw * bh / (w * h) for _, _, bw, bh in boxes])
    ratios = np.array([bw / bh for _, _, bw, bh in boxes])
    slack = 2 / math.sqrt(0.01 * w * h)  # one pixel of rounding on each side, relative
    assert areas.min() >= AREA[0] * (1 - slack) and areas.max() <= AREA[1] * (1 + slack)
    assert ratios.min() >= RATIO[0] * (1 - slack) and ratios.max() <= RATIO[1] * (1 + slack)
    # uniform in area: the whole range is used, and the mean sits near the middle
    assert areas.min() < 0.02 and areas.max() > 0.19
    assert abs(areas.mean() - sum(AREA) / 2) < 0.005
    # log-uniform in ratio: log-ratios centred on 0
    assert abs(np.log(ratios).mean()) < 0.01
    for left, top, bw, bh in boxes:
        assert 0 <= left <= w - bw and 0 <= top <= h - bh


@pytest.mark.parametrize("size", [(1, 1), (2, 900), (900, 3), (33, 17)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_tiny_and_elongated_images_still_crop(size):
    for i in range(20):
        left, top, bw, bh = corruption_box(*size, 0, i)
        assert 1 <= bw <= size[0] and 1 <= bh <= size[1]
        assert left + bw <= size[0] and top + bh <= size[1]


def test_corrupted_image_keeps_size_and_differs():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    out = corrupt_image(image, seed=1, index=2)
    assert out.size == image.size and out.mode == "RGB"
    assert np.asarray(out).tobytes() != np.asarray(image).tobytes()
    assert np.asarray(corrupt_image(image, 1, 2)).tobytes() == np.asarray(out).tobytes()


@pytest.mark.parametrize("area, ratio, name", [
    ((0.3, 0.2), RATIO, "corruption_area"), ((0.1, 1.5), RATIO, "corruption_area"), ((0.1,), RATIO, "corruption_area"),
    (AREA, (0.0, 1.0), "corruption_ratio"), (AREA, (2.0, 1.0), "corruption_ratio"),
])
def test_bad_ranges_are_refused_where_settings_enter(area, ratio, name):
    with pytest.raises(ValueError, match=name):
        check_corruption(area, ratio)
    example = Example(0, None, array("l", [1, 2]), array("l", [3]), array("l", [4]))
    with pytest.raises(ValueError, match=name):  # the Python API's entry, as MDPOConfig is the CLI's
        PreferenceDataset([example], build_processor(), seed=0, area=area, ratio=ratio)
