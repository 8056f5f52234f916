"""Pipelines: boxes stay on their drawn pixels, exact scale/offset, clipping, masks, config errors."""

import numpy as np
import pytest
import torch

from detkit.data.transforms import build_pipeline
from detkit.registry import ConfigError
from detkit.structures import boxes_to_original

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def _raw(h=60, w=90):
    """A grey image with filled rectangles; each box is exactly its rectangle's pixel extent."""
    image = np.full((h, w, 3), 100, np.uint8)
    boxes = np.array([[5, 4, 25, 20], [40, 30, 88, 58], [60, 2, 64, 10], [0, 45, 12, 60]], np.float32)
    sem = np.zeros((h, w), np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
        image[y1:y2, x1:x2] = COLOURS[k]
        sem[y1:y2, x1:x2] = k + 1
    return {"image": image, "boxes": boxes, "labels": np.arange(4, dtype=np.int64),
            "iscrowd": np.array([False, True, False, False]), "sem_seg": sem, "image_id": 1,
            "orig_size": (h, w), "scale": (1.0, 1.0), "offset": (0.0, 0.0)}


def _colour_extent(image, colour):
    hit = (np.abs(image.astype(int) - np.array(colour)).sum(-1) < 60)
    ys, xs = np.nonzero(hit)
    return (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) if len(xs) else None


PIPELINES = {
    "resize_up": [{"type": "ResizeShortestEdge", "short_edge": 90, "max_size": 1000}],
    "resize_cap": [{"type": "ResizeShortestEdge", "short_edge": [50, 70], "max_size": 80}],
    "letterbox": [{"type": "Letterbox", "size": [64, 64]}],
    "flip_pad": [{"type": "HorizontalFlip", "p": 1.0}, {"type": "PadToMultiple", "divisor": 32}],
    "vflip_letterbox": [{"type": "VerticalFlip", "p": 1.0},
                        {"type": "Letterbox", "size": 100, "pad_value": 0}],
    "affine": [{"type": "Affine", "scale": [0.8, 1.2], "translate_px": [-5, 5], "p": 1.0}],
    "crop_resize": [{"type": "RandomSizedBBoxSafeCrop", "height": 48, "width": 64, "p": 1.0}],
}


@pytest.mark.parametrize("name", list(PIPELINES))
@pytest.mark.parametrize("seed", [0, 1])
def test_boxes_follow_the_drawn_pixels(name, seed):
    pipeline = build_pipeline(PIPELINES[name])
    pipeline.set_seed(seed)
    out = pipeline(_raw())
    assert len(out["boxes"]) == len(out["labels"]) == len(out["iscrowd"]) >= 1
    for box, label, crowd in zip(out["boxes"], out["labels"], out["iscrowd"]):
        assert crowd == (label == 1)                       # per-box fields stay together
        extent = _colour_extent(out["image"], COLOURS[label])
        assert extent is not None
        # Drawn pixels inside the box, and the box no more than ~1.5 px (interpolation) too large.
        np.testing.assert_allclose(extent, box, atol=1.6, err_msg=f"{name} label {label}")
        h, w = out["image"].shape[:2]
        assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h
    # The mask moved with the image.
    assert out["sem_seg"].shape == out["image"].shape[:2]
    for box, label in zip(out["boxes"].astype(int), out["labels"]):
        x1, y1, x2, y2 = box
        region = out["sem_seg"][y1 + 1: y2 - 1, x1 + 1: x2 - 1]
        assert region.size == 0 or (region == label + 1).mean() > 0.7


def test_letterbox_scale_offset_exact_and_maps_back():
    out = build_pipeline([{"type": "Letterbox", "size": 64}])(_raw(60, 90))
    # scale = min(64/60, 64/90) = 64/90; new size 43 x 64 (rounded); top pad (64 - 43) // 2 = 10.
    assert out["image"].shape == (64, 64, 3)
    sx, sy = out["scale"]
    assert sx == pytest.approx(64 / 90) and sy == pytest.approx(43 / 60)
    assert out["offset"] == pytest.approx((0.0, 10.0))
    assert (out["image"][:10] == 114).all() and (out["image"][-11:] == 114).all()
    meta = {"scale": torch.tensor(out["scale"]), "offset": torch.tensor(out["offset"]), "orig_size": (60, 90)}
    back = boxes_to_original(torch.as_tensor(out["boxes"]), meta)
    torch.testing.assert_close(back, torch.as_tensor(_raw()["boxes"]), atol=1e-4, rtol=0)


def test_resize_shortest_edge_sizes():
    pipeline = build_pipeline([{"type": "ResizeShortestEdge", "short_edge": 30, "max_size": 40}])
    out = pipeline(_raw(60, 90))                       # 30/60 = 0.5 -> long side 45 > 40 -> 40/90
    assert out["image"].shape[:2] == (27, 40)
    assert out["scale"] == pytest.approx((40 / 90, 27 / 60))
    sizes = set()
    multi = build_pipeline([{"type": "ResizeShortestEdge", "short_edge": [20, 30, 40], "max_size": 1000}])
    for seed in range(12):
        multi.set_seed(seed)
        sizes.add(multi(_raw(60, 90))["image"].shape[0])
    assert sizes == {20, 30, 40}
    multi.set_seed(3)
    first = multi(_raw())["image"].shape
    multi.set_seed(3)
    assert multi(_raw())["image"].shape == first       # same seed, same choice


def test_scales_compose_with_a_previous_transform():
    raw = dict(_raw(60, 90), scale=(0.5, 0.5), offset=(2.0, 3.0))   # e.g. set by a mosaic wrapper
    out = build_pipeline([{"type": "PadToMultiple", "divisor": 64},
                          {"type": "ResizeShortestEdge", "short_edge": 128, "max_size": 1000}])(raw)
    assert out["image"].shape[:2] == (128, 256)          # 60x90 -> pad 64x128 -> x2
    assert out["scale"] == pytest.approx((1.0, 1.0)) and out["offset"] == pytest.approx((4.0, 6.0))


def test_boxes_leaving_the_image_are_clipped_or_dropped():
    out = build_pipeline([{"type": "Crop", "x_min": 30, "y_min": 0, "x_max": 90, "y_max": 60}])(_raw())
    # Box 0 (x 5..25) is gone, box 3 (x 0..12) too; box 2 kept, box 1 whole; nothing else moved.
    assert out["labels"].tolist() == [1, 2] and out["iscrowd"].tolist() == [True, False]
    np.testing.assert_allclose(out["boxes"], [[10, 30, 58, 58], [30, 2, 34, 10]])
    assert out["offset"] == pytest.approx((-30.0, 0.0))
    out = build_pipeline([{"type": "Crop", "x_min": 50, "y_min": 0, "x_max": 90, "y_max": 60}])(_raw())
    np.testing.assert_allclose(out["boxes"][0], [0, 30, 38, 58])   # box 1 clipped at the crop edge


def test_empty_boxes_and_identity():
    raw = dict(_raw(), boxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64),
               iscrowd=np.zeros(0, bool))
    out = build_pipeline([{"type": "HorizontalFlip", "p": 1.0}])(raw)
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)
    same = build_pipeline([])(_raw())
    np.testing.assert_array_equal(same["boxes"], _raw()["boxes"])


def test_nested_and_config_errors():
    pipeline = build_pipeline([{"type": "OneOf", "p": 1.0, "transforms": [
        {"type": "Blur", "blur_limit": 3}, {"type": "RandomBrightnessContrast"}]}])
    assert pipeline(_raw())["image"].shape == (60, 90, 3)
    with pytest.raises(ConfigError, match=r"pipeline\.0\.type.*HorizontalFlip"):
        build_pipeline([{"type": "HorizontalFlp"}])
    with pytest.raises(ConfigError, match=r"pipeline\.1\.short_edg.*short_edge"):
        build_pipeline([{"type": "HorizontalFlip"}, {"type": "ResizeShortestEdge", "short_edg": 3}])
    with pytest.raises(ConfigError, match=r"pipeline\.0"):
        build_pipeline([{"type": "HorizontalFlip", "p": "often"}])
    with pytest.raises(ConfigError, match="list"):
        build_pipeline({"type": "HorizontalFlip"})
