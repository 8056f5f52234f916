"""Sliced inference (detkit/slicing.py, Predictor(slice_size=...), tools/infer.py --slice).

The end-to-end tests use ``RectOracle``, a stand-in detector whose "detections" are the bounding
boxes of the red (label 0) and green (label 1) rectangles in the pixels it is given, so the right
answer for any tile is known exactly: a rectangle cut by a tile edge is "detected" as the cut
part, which is what a real detector sees there too.
"""

import importlib.util
import itertools
import math
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detkit.config import dump_config
from detkit.inference import Predictor
from detkit.models import DETECTORS
from detkit.models.detectors.base import Detector
from detkit.slicing import SlicedInference, cut_by_inner_edge, drop_covered_cut_boxes, tile_grid, tile_starts

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:Predictor. no checkpoint given")


class RectOracle(Detector):
    """Boxes of the connected red / green components (labels 0 / 1). ``score_by="area"`` scores
    larger components higher, ``"small"`` smaller ones higher (a cut part beats the whole object
    in NMS). ``masks``: also return each component's pixels as Bool[K,h,w] (a Mask R-CNN stand-in).
    Records the number of images of every call in ``calls``, their sizes in ``sizes`` and both in
    the class-wide ``log`` (for models built inside tools/infer.py)."""

    log: list[list[tuple[int, int]]] = []

    def __init__(self, *, num_classes: int = 2, score_by: str = "area", masks: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.score_by, self.with_masks = score_by, masks
        self.gain = torch.nn.Parameter(torch.tensor(1.0))   # something for a checkpoint to hold
        self.calls: list[int] = []
        self.sizes: list[list[tuple[int, int]]] = []

    def forward_test(self, batch):
        sizes = [tuple(int(v) for v in s) for s in batch.image_sizes]
        self.calls.append(len(sizes))
        self.sizes.append(sizes)
        RectOracle.log.append(sizes)
        pixels = batch.tensor * self.pixel_std + self.pixel_mean
        return [self._detect(img, h, w) for img, (h, w) in zip(pixels, sizes)]

    def _detect(self, img, h, w):
        boxes, scores, labels, masks = [], [], [], []
        for label, channel in ((0, 0), (1, 1)):
            others = [c for c in range(3) if c != channel]
            mask = (img[channel, :h, :w] > 0.6) & (img[others, :h, :w] < 0.4).all(0)
            count, components, stats, _ = cv2.connectedComponentsWithStats(mask.numpy().astype(np.uint8))
            for k, (x, y, bw, bh, area) in enumerate(stats[1:count].tolist(), start=1):
                boxes.append([x, y, x + bw, y + bh])
                frac = min(1.0, area / 900)
                scores.append(0.5 + 0.4 * (frac if self.score_by == "area" else 1 - frac))
                labels.append(label)
                masks.append(torch.from_numpy(components == k))
        result = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                  "scores": torch.tensor(scores) * self.gain.detach(),
                  "labels": torch.tensor(labels, dtype=torch.int64)}
        if self.with_masks:
            result["masks"] = torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.bool)
        return result


if "RectOracle" not in DETECTORS:
    DETECTORS.register()(RectOracle)


def oracle_cfg(score_by="area", masks=False):
    return {"model": {"type": "RectOracle", "num_classes": 2, "score_by": score_by, "masks": masks},
            "data": {"class_names": ["red", "green"], "val": {"pipeline": []}}}


def canvas(h, w, red=(), green=()):
    image = np.full((h, w, 3), 110, np.uint8)
    for rects, colour in ((red, (230, 20, 20)), (green, (20, 230, 20))):
        for x0, y0, x1, y1 in rects:
            image[y0:y1, x0:x1] = colour
    return image


def boxes_of(result, label=0):
    return sorted(tuple(round(v, 3) for v in b) for b, lab in
                  zip(result["boxes"].tolist(), result["labels"].tolist()) if lab == label)


# ---------------------------------------------------------------------------------------------
# Tile geometry

GRIDS = [(300, 300, 128, 0.25), (1024, 768, 256, 0.2), (500, 97, 128, 0.2), (129, 1000, 128, 0.0),
         (640, 640, 64, 0.5), (77, 60, 128, 0.2)]


def test_tile_starts_examples():
    assert tile_starts(300, 128, 0.25) == [0, 96, 172]        # stride 128 - 32; last shifted to end at 300
    assert tile_starts(256, 128, 0.0) == [0, 128]
    assert tile_starts(100, 128, 0.2) == [0]                  # shorter than a tile: one tile
    assert tile_starts(128, 128, 0.2) == [0]


@pytest.mark.parametrize("h,w,size,overlap", GRIDS)
def test_tiles_cover_overlap_and_stay_inside(h, w, size, overlap):
    tiles = tile_grid(h, w, size, overlap)
    x0, y0, x1, y1 = tiles.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= w).all() and (y1 <= h).all()
    assert ((x1 - x0) == min(size, w)).all() and ((y1 - y0) == min(size, h)).all()   # never padded
    covered = np.zeros((h, w), int)
    for a, b, c, d in tiles.tolist():
        covered[b:d, a:c] += 1
    assert covered.min() >= 1
    for starts, length in ((tile_starts(w, size, overlap), w), (tile_starts(h, size, overlap), h)):
        assert starts == sorted(set(starts)) and starts[0] == 0 and starts[-1] + min(size, length) == length
        for s, t in zip(starts, starts[1:]):           # neighbours overlap by at least the request
            assert s + size - t >= math.ceil(overlap * size)
    assert len(tiles) == len(tile_starts(w, size, overlap)) * len(tile_starts(h, size, overlap))


def test_image_smaller_than_a_tile_is_one_tile():
    assert tile_grid(100, 120, 128, 0.2).tolist() == [[0, 0, 120, 100]]
    assert tile_grid(128, 128, 128, 0.2).tolist() == [[0, 0, 128, 128]]


@pytest.mark.parametrize("h,w,size,overlap", GRIDS[:4])
def test_every_object_up_to_the_overlap_lies_whole_in_some_tile(h, w, size, overlap):
    """The property the cut-box rule relies on: a whole view exists for such objects."""
    ov = math.ceil(overlap * size)
    if ov == 0:
        return
    tiles = tile_grid(h, w, size, overlap).tolist()
    rng = np.random.default_rng(0)
    for _ in range(300):
        bw, bh = rng.integers(1, min(ov, w, h) + 1, size=2)
        x, y = rng.integers(0, w - bw + 1), rng.integers(0, h - bh + 1)
        assert any(a <= x and b <= y and x + bw <= c and y + bh <= d for a, b, c, d in tiles)


def test_cut_only_at_inner_edges():
    boxes = torch.tensor([[0.0, 10, 20, 30],       # on the image's left border: not an inner edge
                          [100, 10, 127, 30],      # at the tile's right edge (inner): cut
                          [40, 40, 60, 60],        # inside
                          [40, 96, 60, 126],       # 2 px from the bottom edge (inner), margin 2: cut
                          [40, 96, 60, 125]])      # 3 px from it: not cut
    cut = cut_by_inner_edge(boxes, (0, 0, 128, 128), (300, 300), 2.0)
    assert cut.tolist() == [False, True, False, True, False]
    assert cut_by_inner_edge(boxes, (0, 0, 128, 128), (128, 128), 2.0).tolist() == [False] * 5


def test_cut_box_yields_only_to_a_covering_confident_whole_box_of_its_class():
    boxes = torch.tensor([[110.0, 40, 128, 60], [110, 40, 140, 60], [110, 80, 128, 100], [200, 0, 228, 20]])
    scores = torch.tensor([0.8, 0.5, 0.9, 0.9])
    labels = torch.tensor([0, 0, 1, 0])
    cut = torch.tensor([True, False, True, True])
    # box 0: covered by box 1 (same class, score 0.5 >= 0.5 * 0.8) -> dropped; box 2: nothing of
    # class 1 covers it -> kept; box 3: no box covers it -> kept
    assert drop_covered_cut_boxes(boxes, scores, labels, cut, 0.6).tolist() == [False, True, True, True]
    assert drop_covered_cut_boxes(boxes, scores, torch.tensor([0, 1, 1, 0]), cut, 0.6).tolist() == [True] * 4
    low = torch.tensor([0.8, 0.3, 0.9, 0.9])       # a background peak far less sure than the part
    assert drop_covered_cut_boxes(boxes, low, labels, cut, 0.6).tolist() == [True] * 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="slice_overlap"):
        SlicedInference(slice_size=128, overlap=1.0)
    with pytest.raises(ValueError, match="slice_merge"):
        SlicedInference(slice_size=128, merge="mean")
    with pytest.raises(ValueError, match="slice_size"):
        SlicedInference(slice_size=0)


# ---------------------------------------------------------------------------------------------
# End to end through Predictor with the oracle

STRADDLE = (116, 40, 146, 60)    # across x = 128, the first tile's right edge (tiles start 0, 96, 172);
                                 # the first tile sees 12 of its 30 columns: IoU 0.4 with the whole
CORNER = (120, 118, 135, 140)    # across the corner of four tiles (x = 128 and y = 128)
BORDER = (280, 250, 300, 270)    # at the image's right border, inside the inward-shifted last tile
INNER = (20, 200, 50, 215)       # inside one tile only


@pytest.mark.parametrize("merge,full_image,score_by", list(itertools.product(
    ["nms", "wbf"], [True, False], ["area", "small"])))
def test_each_rectangle_found_once_with_exact_coordinates(merge, full_image, score_by):
    image = canvas(300, 300, red=[STRADDLE, CORNER, BORDER, INNER], green=[(60, 100, 100, 110)])
    predictor = Predictor(oracle_cfg(score_by), None, score_thr=0.0, batch_size=4, slice_size=128,
                          slice_overlap=0.25, slice_merge=merge, full_image=full_image)
    result = predictor(image)
    assert boxes_of(result, 0) == sorted([STRADDLE, CORNER, BORDER, INNER])
    assert boxes_of(result, 1) == [(60, 100, 100, 110)]         # cut into 2 tiles at x = 96
    assert set(result["label_names"]) == {"red", "green"} and result["image_size"] == (300, 300)


def test_plain_nms_alone_would_report_a_cut_rectangle_twice():
    """Why the cut-box rule exists: without it the part in the first tile survives NMS."""
    image = canvas(300, 300, red=[STRADDLE])
    slicer = SlicedInference(slice_size=128, overlap=0.25, full_image=False, cover_thr=1.1)  # never yields
    predictor = Predictor(oracle_cfg(), None, score_thr=0.0)
    plain = lambda tiles: predictor.predict_arrays(tiles, sliced=False)  # noqa: E731
    assert boxes_of(slicer(image, plain, 4)) == sorted([(116, 40, 128, 60), STRADDLE])


def test_tiles_of_several_images_share_batches_then_the_full_images():
    predictor = Predictor(oracle_cfg(), None, score_thr=0.0, batch_size=4, slice_size=128, slice_overlap=0.25)
    predictor(canvas(300, 300, red=[INNER]))
    assert predictor.model.calls == [4, 4, 1, 1]                 # 9 tiles, then the whole image
    predictor.model.calls.clear()
    # 9 + 1 (a one-tile image: plain inference, batched with the tiles) + 6 tiles, 5 per pass;
    # then the two multi-tile images' whole views in one pass
    images = [canvas(300, 300, red=[STRADDLE]), canvas(100, 120, red=[(10, 10, 30, 40)]),
              canvas(200, 300, green=[(60, 100, 100, 110)])]
    predictor.batch_size = 5
    results = predictor.predict_arrays(images)
    assert predictor.model.calls == [5, 5, 5, 1, 2]
    assert predictor.model.sizes[-1] == [(300, 300), (200, 300)]
    assert [boxes_of(r, 0) for r in results] == [[STRADDLE], [(10, 10, 30, 40)], []]
    assert boxes_of(results[2], 1) == [(60, 100, 100, 110)] and results[1]["image_size"] == (100, 120)
    predictor.model.calls.clear()
    predictor.slicer.full_image = False
    predictor.batch_size = 4
    predictor.predict_arrays([canvas(300, 300), canvas(300, 300)])
    assert predictor.model.calls == [4, 4, 4, 4, 2]


def test_wbf_over_tiles_keeps_the_best_member_score_nms_unchanged():
    from detkit.slicing import merge_tile_detections

    boxes = torch.tensor([[10.0, 10, 50, 50], [12, 10, 50, 52], [100, 100, 120, 130], [11, 10, 50, 50]])
    scores, labels = torch.tensor([0.3, 0.9, 0.5, 0.7]), torch.tensor([0, 0, 0, 1])
    b, sc, lab, src = merge_tile_detections(boxes, scores, labels, merge="wbf", iou_thr=0.5)
    assert sc.tolist() == pytest.approx([0.9, 0.7, 0.5]) and lab.tolist() == [0, 1, 0]
    assert src.tolist() == [1, 3, 2]                       # the best member (its mask is kept)
    assert b[0].tolist() == pytest.approx(((boxes[0] * 0.3 + boxes[1] * 0.9) / 1.2).tolist())
    _, mean, _, _ = merge_tile_detections(boxes, scores, labels, merge="wbf", iou_thr=0.5, wbf_score="mean")
    assert mean.tolist() == pytest.approx([0.7, 0.6, 0.5])
    b, sc, lab, src = merge_tile_detections(boxes, scores, labels, merge="nms", iou_thr=0.5, max_detections=2)
    assert src.tolist() == [1, 3] and torch.equal(b, boxes[[1, 3]])
    assert sc.tolist() == pytest.approx([0.9, 0.7])
    # End to end: the straddling rectangle's cut part (0.607) fused with its whole view (0.767)
    image = canvas(300, 300, red=[STRADDLE])
    predictor = Predictor(oracle_cfg(), None, score_thr=0.0)
    plain = lambda tiles: predictor.predict_arrays(tiles, sliced=False)  # noqa: E731
    slicer = SlicedInference(slice_size=128, overlap=0.25, merge="wbf", full_image=False, cover_thr=1.1,
                             iou_thr=0.3)
    result = slicer(image, plain, 4)
    assert result["scores"].tolist() == pytest.approx([0.5 + 0.4 * 600 / 900])
    with pytest.raises(ValueError, match="wbf_score"):
        SlicedInference(slice_size=128, wbf_score="median")


def rect_mask(h, w, rect):
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[rect[1]:rect[3], rect[0]:rect[2]] = True
    return mask


@pytest.mark.parametrize("merge,full_image", list(itertools.product(["nms", "wbf"], [True, False])))
def test_mask_model_sliced_returns_each_objects_mask_in_image_pixels(merge, full_image):
    rects = [STRADDLE, CORNER, BORDER, INNER]
    predictor = Predictor(oracle_cfg(masks=True), None, score_thr=0.0, batch_size=3, slice_size=128,
                          slice_overlap=0.25, slice_merge=merge, full_image=full_image)
    big, small = canvas(300, 300, red=rects[:3], green=[INNER]), canvas(90, 120, red=[(5, 6, 40, 50)])
    results = predictor.predict_arrays([big, small])
    for result, (h, w) in zip(results, [(300, 300), (90, 120)]):   # many tiles or one: same format
        assert result["masks"].dtype == torch.bool and result["masks"].shape == (len(result["boxes"]), h, w)
        for box, mask in zip(result["boxes"].round().int().tolist(), result["masks"]):
            assert torch.equal(mask, rect_mask(h, w, box)), box
    assert boxes_of(results[0], 0) == sorted(rects[:3]) and boxes_of(results[0], 1) == [INNER]
    empty = predictor.predict_arrays([canvas(300, 300)])[0]
    assert empty["masks"].shape == (0, 300, 300)


def test_full_image_size_runs_the_whole_view_at_the_models_size():
    big = (20, 20, 260, 200)      # larger than a tile: only the whole view sees it uncut
    image = canvas(300, 300, red=[big, (20, 250, 50, 265)])
    predictor = Predictor(oracle_cfg(masks=True), None, score_thr=0.0, batch_size=9, slice_size=128,
                          slice_overlap=0.25, full_image_size=150)
    result = predictor(image)
    assert predictor.model.sizes[-1] == [(150, 150)]            # not a second 300 x 300 pass
    assert boxes_of(result) == sorted([big, (20, 250, 50, 265)])
    for box, mask in zip(result["boxes"].round().int().tolist(), result["masks"]):
        assert torch.equal(mask, rect_mask(300, 300, box)), box
    predictor.slicer.full_image_size = 1000                      # never enlarges
    predictor(canvas(300, 200))
    assert predictor.model.sizes[-1] == [(300, 200)]
    with pytest.raises(ValueError, match="full_image_size"):
        SlicedInference(slice_size=128, full_image_size=0)


# ---------------------------------------------------------------------------------------------
# tools/infer.py --slice

spec = importlib.util.spec_from_file_location("infer_tool", ROOT / "tools" / "infer.py")
infer = importlib.util.module_from_spec(spec)
sys.modules["infer_tool"] = infer
spec.loader.exec_module(infer)


def test_infer_tool_slice_options(tmp_path, capsys):
    import json

    cfg_path, ckpt = tmp_path / "oracle.yaml", tmp_path / "oracle.pth"
    dump_config(oracle_cfg(), cfg_path)
    torch.save({"model": {"gain": torch.tensor(1.0)}, "meta": {"class_names": ["red", "green"]}}, ckpt)
    cv2.imwrite(str(tmp_path / "big.png"), cv2.cvtColor(canvas(300, 300, red=[STRADDLE]), cv2.COLOR_RGB2BGR))
    args = [str(cfg_path), str(ckpt), str(tmp_path / "big.png"), "--no-draw", "--score-thr", "0"]
    assert infer.main(args + ["--out", str(tmp_path / "a"), "--slice", "128", "--slice-overlap", "0.25",
                              "--slice-merge", "wbf", "--no-full-image"]) == 0
    records = json.loads((tmp_path / "a" / "predictions.json").read_text())
    assert [(r["category_name"], r["bbox"]) for r in records] == [("red", [116.0, 40.0, 30.0, 20.0])]
    for bad in (["--slice", "0"], ["--slice", "64", "--slice-overlap", "1.5"]):
        with pytest.raises(SystemExit) as exc:
            infer.main(args + ["--out", str(tmp_path / "b"), *bad])
        assert exc.value.code == 2
    assert "--slice-overlap must be in [0, 1)" in capsys.readouterr().err


def test_infer_tool_batches_the_tiles_of_a_folders_images(tmp_path):
    """--batch-size images are read per step, their tiles predicted --batch-size per pass."""
    import json

    cfg_path, ckpt, folder = tmp_path / "oracle.yaml", tmp_path / "oracle.pth", tmp_path / "images"
    dump_config(oracle_cfg(), cfg_path)
    torch.save({"model": {"gain": torch.tensor(1.0)}, "meta": {"class_names": ["red", "green"]}}, ckpt)
    folder.mkdir()
    rects = [STRADDLE, CORNER, INNER]
    for k, rect in enumerate(rects):
        cv2.imwrite(str(folder / f"{k}.png"), cv2.cvtColor(canvas(300, 300, red=[rect]), cv2.COLOR_RGB2BGR))
    RectOracle.log.clear()
    assert infer.main([str(cfg_path), str(ckpt), str(folder), "--no-draw", "--score-thr", "0", "--out",
                       str(tmp_path / "out"), "--slice", "128", "--slice-overlap", "0.25",
                       "--batch-size", "4", "--full-image-size", "150"]) == 0
    assert [len(sizes) for sizes in RectOracle.log] == [4] * 6 + [3, 3]    # 27 tiles, 3 whole views
    assert RectOracle.log[-1] == [(150, 150)] * 3
    records = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert sorted((r["file_name"], r["bbox"]) for r in records) == [
        (f"{k}.png", [float(x0), float(y0), float(x1 - x0), float(y1 - y0)])
        for k, (x0, y0, x1, y1) in enumerate(rects)]
    with pytest.raises(SystemExit) as exc:
        infer.main([str(cfg_path), str(ckpt), str(folder), "--out", str(tmp_path / "b"), "--slice", "128",
                    "--full-image-size", "0"])
    assert exc.value.code == 2
