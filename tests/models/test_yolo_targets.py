"""YOLOv3 grid maths: assignment against hand-computed expectations, encode/decode round trips."""

import math

import pytest
import torch
from torchvision.ops import box_iou

from detkit.models.heads.yolo_head import COCO_ANCHORS
from detkit.models.yolo_targets import (
    assign_anchors,
    box_ioa,
    decode_boxes,
    encode_boxes,
    ignore_mask,
    make_priors,
    shape_iou,
)

STRIDES = [8, 16, 32]


def priors_for(size=416, anchors=COCO_ANCHORS):
    sizes = [(size // s, size // s) for s in STRIDES]
    return make_priors(sizes, STRIDES, torch.tensor(anchors, dtype=torch.float32))


def test_prior_layout_is_level_anchor_row_col():
    p = priors_for(64)   # grids 8x8, 4x4, 2x2; 3 anchors each
    assert len(p.cells) == 3 * (64 + 16 + 4)
    assert p.offsets == [0, 192, 240]
    # level 1, anchor 2, row 3, col 1  ->  192 + (2*4 + 3)*4 + 1
    i = 192 + (2 * 4 + 3) * 4 + 1
    assert p.cells[i].tolist() == [1.0, 3.0]
    assert p.strides[i].item() == 16
    assert p.anchor_wh[i].tolist() == [59.0, 119.0]


def test_shape_iou_hand_values():
    got = shape_iou(torch.tensor([[12.0, 14.0]]), torch.tensor([[10.0, 13.0], [16.0, 30.0]]))
    # (10*13) / (12*14) and (12*14) / (16*30): one box contains the other
    assert torch.allclose(got, torch.tensor([[130 / 168, 168 / 480]]))


def test_assignment_picks_hand_computed_level_anchor_cell():
    p = priors_for(416)              # grids 52, 26, 13; level offsets 0, 8112, 10140
    boxes = torch.tensor([
        [94.0, 53.0, 106.0, 67.0],   # 12x14 at (100, 60): anchor (10,13) IoU 130/168 -> L0 A0, cell (12, 7)
        [125.0, 205.0, 275.0, 395.0],  # 150x190 at (200,300): (156,198) -> L2 A1, cell (6, 9)
        [386.0, 393.5, 446.0, 438.5],  # 60x45 centred on the corner (416,416): (62,45) -> L1 A1, cell (25,25)
    ])
    m = assign_anchors(boxes, p)
    expected = {0: 0 + (0 * 52 + 7) * 52 + 12,
                1: 3 * 52 * 52 + 3 * 26 * 26 + (1 * 13 + 9) * 13 + 6,
                2: 3 * 52 * 52 + (1 * 26 + 25) * 26 + 25}
    assert dict(zip(m.gt_index.tolist(), m.pred_index.tolist())) == expected
    assert p.anchor_wh[expected[1]].tolist() == [156.0, 198.0]


def test_multi_anchor_option_adds_anchors_above_threshold():
    p = priors_for(416)
    box = torch.tensor([[85.0, 85.0, 115.0, 115.0]])   # 30x30 at (100, 100)
    # shape IoUs: (33,23) 690/969=0.71, (16,30) 480/900=0.53, (30,61) 900/1830=0.49, (10,13) 0.14
    single = assign_anchors(box, p)
    multi = assign_anchors(box, p, multi_anchor_thr=0.5)
    cell = 12 * 52 + 12
    assert single.pred_index.tolist() == [2 * 52 * 52 + cell]
    assert sorted(multi.pred_index.tolist()) == [1 * 52 * 52 + cell, 2 * 52 * 52 + cell]
    assert multi.gt_index.tolist() == [0, 0]


def test_conflicting_boxes_keep_the_better_shape_match():
    p = priors_for(416)
    boxes = torch.tensor([[96.0, 94.0, 104.0, 106.0],    # 8x12, shape IoU with (10,13) 96/130
                          [95.0, 94.0, 105.0, 107.0]])   # 10x13, identical to the anchor
    m = assign_anchors(boxes, p)
    assert m.pred_index.tolist() == [12 * 52 + 12]
    assert m.gt_index.tolist() == [1]


def test_empty_assignment():
    m = assign_anchors(torch.zeros(0, 4), priors_for(64))
    assert m.pred_index.shape == (0,) and m.gt_index.shape == (0,)


@pytest.mark.parametrize("level", [0, 1, 2])
def test_encode_decode_round_trip_every_level_border_and_tiny(level):
    size = 416
    p = priors_for(size)
    torch.manual_seed(level)
    anchors = torch.tensor(COCO_ANCHORS[level], dtype=torch.float32)
    wh = anchors[torch.randint(0, 3, (40,))] * torch.empty(40, 2).uniform_(0.6, 1.5)
    centre = torch.rand(40, 2) * size
    boxes = torch.cat([centre - wh / 2, centre + wh / 2], dim=1)
    special = torch.tensor([
        [0.0, 0.0, 1.0, 1.0], [415.0, 415.0, 416.0, 416.5], [0.0, 200.0, 2.0, 203.0],   # tiny
        [0.0, 0.0, 12.0, 15.0], [404.0, 401.0, 416.0, 416.0],                           # corners
        [0.0, 0.0, 416.0, 416.0], [0.0, 100.0, 416.0, 300.0], [380.0, 0.0, 416.0, 60.0],  # borders
    ])
    boxes = torch.cat([boxes, special])
    # one box at a time, so that boxes sharing a cell do not hide each other
    matches = [assign_anchors(b[None], p) for b in boxes]
    assert all(len(m.pred_index) == 1 for m in matches)
    pred_index = torch.cat([m.pred_index for m in matches])
    lo = p.offsets[level]
    hi = p.offsets[level + 1] if level < 2 else len(p.cells)
    sel = (pred_index >= lo) & (pred_index < hi)
    idx, gts = pred_index[sel], boxes[sel]
    assert sel[:40].sum() >= 20            # boxes drawn around this level's anchors land here
    if level == 0:
        assert sel[40:43].all()            # the tiny ones too
    offset_xy, log_wh = encode_boxes(gts, p.cells[idx], p.strides[idx], p.anchor_wh[idx])
    assert ((offset_xy >= 0) & (offset_xy <= 1)).all()
    decoded = decode_boxes(offset_xy, log_wh, p.cells[idx], p.strides[idx], p.anchor_wh[idx])
    ious = box_iou(decoded, gts).diagonal()
    assert (ious > 0.99).all(), ious.min()


def test_round_trip_every_level_for_the_same_box():
    """The same box encoded at a forced level (any anchor, centre cell) decodes back identically."""
    p = priors_for(416)
    box = torch.tensor([[407.5, 0.25, 416.0, 3.75]])   # tiny, touching the top-right corner
    for level, (h, w) in enumerate(p.sizes):
        s = STRIDES[level]
        col, row = min(int(411.75 // s), w - 1), int(2.0 // s)
        for a in range(3):
            i = p.offsets[level] + (a * h + row) * w + col
            off, lwh = encode_boxes(box, p.cells[i:i + 1], p.strides[i:i + 1], p.anchor_wh[i:i + 1])
            out = decode_boxes(off, lwh, p.cells[i:i + 1], p.strides[i:i + 1], p.anchor_wh[i:i + 1])
            assert box_iou(out, box).item() > 0.99


def test_decode_matches_paper_formula():
    p = priors_for(64)
    i = p.offsets[1] + (1 * 4 + 2) * 4 + 3    # level 1 (stride 16), anchor 1 (62x45), row 2, col 3
    tx, ty, tw, th = 0.3, -1.2, 0.5, -0.25
    out = decode_boxes(torch.tensor([[tx, ty]]).sigmoid(), torch.tensor([[tw, th]]),
                       p.cells[i:i + 1], p.strides[i:i + 1], p.anchor_wh[i:i + 1])[0]
    sig = lambda v: 1 / (1 + math.exp(-v))    # noqa: E731
    bx, by = (sig(tx) + 3) * 16, (sig(ty) + 2) * 16
    bw, bh = 62 * math.exp(tw), 45 * math.exp(th)
    assert torch.allclose(out, torch.tensor([bx - bw / 2, by - bh / 2, bx + bw / 2, by + bh / 2]))


def test_ioa_and_ignore_mask():
    preds = torch.tensor([[10.0, 10.0, 20.0, 20.0],     # equals the gt: IoU 1
                          [12.0, 10.0, 22.0, 20.0],     # IoU 80/120 = 0.667 > 0.5
                          [15.0, 10.0, 25.0, 20.0],     # IoU 50/150 = 0.333
                          [60.0, 60.0, 70.0, 70.0],     # fully inside the crowd region (IoA 1)
                          [95.0, 60.0, 105.0, 70.0]])   # half inside the crowd region (IoA 0.5)
    gt = torch.tensor([[10.0, 10.0, 20.0, 20.0]])
    crowd = torch.tensor([[50.0, 50.0, 100.0, 100.0]])
    assert torch.allclose(box_ioa(preds[3:], crowd).flatten(), torch.tensor([1.0, 0.5]))
    assert ignore_mask(preds, gt, crowd, 0.5).tolist() == [True, True, False, True, False]
    assert ignore_mask(preds, torch.zeros(0, 4), torch.zeros(0, 4), 0.5).sum() == 0
