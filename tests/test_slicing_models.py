"""Sliced inference with real detkit models (random weights): the merged result of every family,
Mask R-CNN included, equals an independent reference built from plain inference of the tiles."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms

from detkit.config import load_config
from detkit.inference import Predictor

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:Predictor. no checkpoint given")

FAMILIES = ["centernet/centernet_r18_shapes.yaml", "yolo/yolov3_tiny_shapes.yaml",
            "faster_rcnn/faster_rcnn_r18_fpn_shapes.yaml", "rfcn/rfcn_r18_shapes.yaml",
            "mask_rcnn/mask_rcnn_r18_fpn_shapes.yaml"]

# 96 px tiles, overlap ceil(0.2 * 96) = 20 px -> stride 76; the last tile of a side ends at the
# border: x starts 0, 76, 104 (width 200), y starts 0, 54 (height 150), written out by hand.
TILE, X_STARTS, Y_STARTS = 96, (0, 76, 104), (0, 54)


def tile_reference(predictor, image):
    """What slicing must give without the full-image pass and with cut boxes never yielding:
    class-wise NMS (IoU 0.5) over the plain predictions of each tile, predicted one at a time
    and shifted by the tile's origin; masks pasted at the tile's place in the image."""
    h, w = image.shape[:2]
    boxes, scores, labels, masks = [], [], [], []
    for y in Y_STARTS:
        for x in X_STARTS:
            crop = np.ascontiguousarray(image[y:y + TILE, x:x + TILE])
            tile = predictor.predict_arrays([crop], sliced=False)[0]
            boxes.append(tile["boxes"] + torch.tensor([x, y, x, y], dtype=torch.float32))
            scores.append(tile["scores"])
            labels.append(tile["labels"])
            if "masks" in tile:
                full = torch.zeros(len(tile["masks"]), h, w, dtype=torch.bool)
                full[:, y:y + TILE, x:x + TILE] = tile["masks"]
                masks.append(full)
    boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    keep = batched_nms(boxes, scores, labels, 0.5)
    ref = {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
    if masks:
        ref["masks"] = torch.cat(masks)[keep]
    return ref


def match(got, want, min_fraction):
    """Pairs (i, j) of detections with the same label, boxes within 1e-3 px and scores within
    1e-4; asserts that at least ``min_fraction`` of both sides are paired. (Tiles batched with
    others run through other kernels than alone; on random weights a rare near-tie in the
    model's own NMS can flip, so a few unpaired low scores are tolerated, never a pattern.)"""
    pairs, used = [], set()
    for j, (box, score, label) in enumerate(zip(want["boxes"], want["scores"], want["labels"])):
        close = ((got["boxes"] - box).abs().amax(dim=1) < 1e-3) & ((got["scores"] - score).abs() < 1e-4)
        close &= got["labels"] == label
        for i in torch.nonzero(close).flatten().tolist():
            if i not in used:
                used.add(i)
                pairs.append((i, j))
                break
    assert len(pairs) >= min_fraction * max(len(got["boxes"]), len(want["boxes"])), \
        (len(pairs), len(got["boxes"]), len(want["boxes"]))
    return pairs


@pytest.mark.parametrize("config", FAMILIES)
def test_every_family_sliced_equals_nms_over_its_tiles(config):
    """Two images in one call, ``batch_size`` 4: the tiles of a 150 x 200 image and a one-tile
    90 x 96 image share forward passes. The big image's result must equal the tile reference
    (so tile offsets, batching across images and, for Mask R-CNN, the masks carried into
    image pixels are right), the one-tile image's plain inference."""
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / config, ["data.val.pipeline=[]"])
    predictor = Predictor(cfg, None, score_thr=0.0, batch_size=4, slice_size=TILE, slice_overlap=0.2,
                          full_image=False, class_names=["a", "b", "c", "d"])
    predictor.slicer.cover_thr = 1.1             # cut boxes never yield: the reference is plain NMS
    rng = np.random.default_rng(1)
    big = rng.integers(0, 255, size=(150, 200, 3), dtype=np.uint8)
    small = rng.integers(0, 255, size=(90, 96, 3), dtype=np.uint8)
    got, got_small = predictor.predict_arrays([big, small])
    want, want_small = tile_reference(predictor, big), predictor.predict_arrays([small], sliced=False)[0]
    assert len(want["boxes"]) > 50 and got["image_size"] == (150, 200) and got_small["image_size"] == (90, 96)
    pairs = match(got, want, 0.99)
    match(got_small, want_small, 0.99)
    assert (got["scores"][:-1] >= got["scores"][1:]).all()             # merged, best first
    assert ("masks" in got) == ("masks" in want_small) == config.startswith("mask_rcnn")
    if "masks" in want:
        assert got["masks"].shape == (len(got["boxes"]), 150, 200)
        assert got_small["masks"].shape[1:] == (90, 96)
        assert got["masks"].any(dim=(1, 2)).float().mean() > 0.5       # not a tensor of empties
        for i, j in pairs:                      # a pixel may flip where the probability is 0.5
            assert (got["masks"][i] ^ want["masks"][j]).sum() <= 2, (i, j)


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
