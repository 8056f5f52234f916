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
    in NMS). Records the number of images of every call in ``calls``."""

    def __init__(self, *, num_classes: int = 2, score_by: str = "area", **kwargs):
        super().__init__(**kwargs)
        self.score_by = score_by
        self.gain = torch.nn.Parameter(torch.tensor(1.0))   # something for a checkpoint to hold
        self.calls: list[int] = []

    def forward_test(self, batch):
        self.calls.append(len(batch.image_sizes))
        pixels = batch.tensor * self.pixel_std + self.pixel_mean
        results = []
        for img, (h, w) in zip(pixels, batch.image_sizes):
            boxes, scores, labels = [], [], []
            for label, channel in ((0, 0), (1, 1)):
                others = [c for c in range(3) if c != channel]
                mask = (img[channel, :h, :w] > 0.6) & (img[others, :h, :w] < 0.4).all(0)
                count, _, stats, _ = cv2.connectedComponentsWithStats(mask.numpy().astype(np.uint8))
                for x, y, bw, bh, area in stats[1:count].tolist():
                    boxes.append([x, y, x + bw, y + bh])
                    frac = min(1.0, area / 900)
                    scores.append(0.5 + 0.4 * (frac if self.score_by == "area" else 1 - frac))
                    labels.append(label)
            results.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                            "scores": torch.tensor(scores) * self.gain.detach(),
                            "labels": torch.tensor(labels, dtype=torch.int64)})
        return results


if "RectOracle" not in DETECTORS:
    DETECTORS.register()(RectOracle)


def oracle_cfg(score_by="area"):
    return {"model": {"type": "RectOracle", "num_classes": 2, "score_by": score_by},
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


def test_tiles_go_in_batches_of_batch_size_then_the_full_image():
    predictor = Predictor(oracle_cfg(), None, score_thr=0.0, batch_size=4, slice_size=128, slice_overlap=0.25)
    predictor(canvas(300, 300, red=[INNER]))
    assert predictor.model.calls == [4, 4, 1, 1]                 # 9 tiles, then the whole image
    predictor.model.calls.clear()
    predictor.slicer.full_image = False
    predictor.predict_arrays([canvas(300, 300), canvas(300, 300)])
    assert predictor.model.calls == [4, 4, 1] * 2


@pytest.mark.parametrize("size", [(100, 120), (128, 128)])
def test_one_tile_equals_plain_inference_with_a_real_model(size):
    cfg = {"model": {"type": "OneStageDetector", "num_classes": 3,
                     "backbone": {"type": "ResNet", "depth": 18, "out_features": ["c5"], "weights": None},
                     "neck": {"type": "CenterNetUpsample", "channels": [32, 16, 16]},
                     "head": {"type": "CenterNetHead", "head_channels": 16}},
           "data": {"class_names": ["a", "b", "c"], "val": {"pipeline": []}}}
    torch.manual_seed(0)
    plain = Predictor(cfg, None, score_thr=0.0)
    sliced = Predictor(cfg, None, score_thr=0.0, slice_size=128, slice_merge="wbf")
    sliced.model.load_state_dict(plain.model.state_dict())
    image = np.random.default_rng(0).integers(0, 255, size=(*size, 3), dtype=np.uint8)
    a, b = plain(image), sliced(image)
    assert len(a["boxes"]) > 0
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(a[key], b[key]), key
    assert a["label_names"] == b["label_names"] and a["image_size"] == b["image_size"]


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


FAMILIES = ["centernet/centernet_r18_shapes.yaml", "yolo/yolov3_tiny_shapes.yaml",
            "faster_rcnn/faster_rcnn_r18_fpn_shapes.yaml", "rfcn/rfcn_r18_shapes.yaml"]


@pytest.mark.parametrize("config", FAMILIES)
def test_every_detector_family_runs_sliced(config):
    """Slicing only needs the predictor's per-batch function: any detector works."""
    from detkit.config import load_config

    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / config, ["data.val.pipeline=[]"])
    predictor = Predictor(cfg, None, score_thr=0.0, batch_size=3, slice_size=96, slice_overlap=0.2,
                          class_names=["a", "b", "c", "d"])
    image = np.random.default_rng(1).integers(0, 255, size=(150, 200, 3), dtype=np.uint8)
    result = predictor(image)
    boxes = result["boxes"]
    assert len(boxes) > 0 and result["image_size"] == (150, 200)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 200).all() and (boxes[:, 3] <= 150).all()
    assert (result["scores"][:-1] >= result["scores"][1:]).all()        # merged, best first


def test_weighted_boxes_fusion_equals_its_per_pair_definition():
    """WBF compares each box with all clusters at once (sliced inference merges thousands of
    boxes); the result must be that of the plain loop over clusters in its docstring."""
    from torchvision.ops import box_iou

    from detkit.models.multiscale import weighted_boxes_fusion

    def reference(boxes, scores, labels, iou_thr, num_views):
        fused, members, cluster_labels = [], [], []
        for idx in torch.argsort(scores, descending=True).tolist():
            best, best_iou = -1, iou_thr
            for c, box in enumerate(fused):
                iou = box_iou(box[None], boxes[idx][None])[0, 0].item()
                if cluster_labels[c] == int(labels[idx]) and iou > best_iou:
                    best, best_iou = c, iou
            if best < 0:
                fused.append(boxes[idx].clone())
                members.append([idx])
                cluster_labels.append(int(labels[idx]))
            else:
                members[best].append(idx)
                w = scores[members[best]]
                fused[best] = (boxes[members[best]] * w[:, None]).sum(0) / w.sum()
        out_scores = torch.stack([scores[m].mean() * min(len(m), num_views) / num_views for m in members])
        return torch.stack(fused), out_scores, torch.tensor(cluster_labels)

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(150, 2, generator=g) * 120
    boxes = torch.cat([xy, xy + torch.rand(150, 2, generator=g) * 30 + 5], 1)
    scores, labels = torch.rand(150, generator=g), torch.randint(0, 3, (150,), generator=g)
    for iou_thr, num_views in ((0.3, 2), (0.55, 1)):
        got = weighted_boxes_fusion(boxes, scores, labels, iou_thr=iou_thr, num_views=num_views)
        want = reference(boxes, scores, labels, iou_thr, num_views)
        assert len(got[0]) < 150
        for a, b in zip(got, want):
            assert torch.equal(a, b)
