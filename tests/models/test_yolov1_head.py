"""YOLOv1 head: target round trip, responsibility, the paper's loss terms, empty images."""

import pytest
import torch
from torchvision.ops import box_iou

from detkit.models.heads.yolov1_head import YOLOv1Head, yolov1_decode_boxes, yolov1_encode_targets
from detkit.structures import ShapeSpec

STRIDE = 32


def make_head(**kw):
    torch.manual_seed(0)
    return YOLOv1Head(input_shapes={"c5": ShapeSpec(16, STRIDE)}, num_classes=3, hidden_channels=16, **kw)


def test_encode_decode_round_trip_incl_border_and_tiny():
    boxes = torch.tensor([[0.0, 0.0, 40.0, 30.0],        # at the top-left border
                          [200.0, 180.0, 224.0, 224.0],  # at the bottom-right border
                          [100.0, 100.0, 103.0, 102.0],  # tiny (3 x 2 px)
                          [20.0, 120.0, 220.0, 200.0]])  # large
    labels = torch.tensor([0, 1, 2, 0])
    enc = yolov1_encode_targets(boxes, labels, (7, 7), STRIDE)
    assert enc["obj"].sum() == 4
    decoded = yolov1_decode_boxes(enc["box"][None, None], STRIDE)[0, 0]  # [S,S,4]
    got = decoded[enc["obj"]]
    iou = box_iou(got, boxes).max(dim=0).values
    assert (iou > 0.99).all(), iou
    assert sorted(enc["label"][enc["obj"]].tolist()) == [0, 0, 1, 2]


def test_one_object_per_cell_keeps_largest():
    boxes = torch.tensor([[40.0, 40.0, 50.0, 50.0], [10.0, 10.0, 80.0, 80.0]])  # both centres in cell (1,1)
    enc = yolov1_encode_targets(boxes, torch.tensor([2, 1]), (7, 7), STRIDE)
    assert enc["obj"].sum() == 1 and enc["label"][1, 1] == 1


def test_responsibility_goes_to_highest_iou_predictor():
    head = make_head(num_boxes=2)
    gt = torch.tensor([[64.0, 64.0, 128.0, 128.0]])  # centre (96, 96) -> cell (3, 3)
    box = torch.full((1, 2, 4, 7, 7), 0.5)
    # predictor 0: a small box at the right centre; predictor 1: the exact box
    box[0, 0, :, 3, 3] = torch.tensor([0.0, 0.0, (16 / 224) ** 0.5, (16 / 224) ** 0.5])
    box[0, 1, :, 3, 3] = torch.tensor([0.0, 0.0, (64 / 224) ** 0.5, (64 / 224) ** 0.5])
    outputs = {"box": box, "conf": torch.full((1, 2, 7, 7), 0.5), "cls_prob": torch.full((1, 3, 7, 7), 1 / 3)}
    a = head.assign(outputs, [{"boxes": gt, "labels": torch.tensor([1])}])
    assert a["responsible"].sum() == 1 and a["responsible"][0, 1, 3, 3]
    # hand-computed IoU of the responsible prediction (exact box) is 1, of the other 16^2/64^2
    assert torch.isclose(a["iou"][0, 1, 3, 3], torch.tensor(1.0), atol=1e-5)
    assert torch.isclose(a["iou"][0, 0, 3, 3], torch.tensor(256 / 4096), atol=1e-5)
    # the x,y offsets (0.0) differ from the target (0.0: centre at the cell corner) only in w/h
    losses = head.loss(outputs, [{"boxes": gt, "labels": torch.tensor([1])}], [(224, 224)])
    assert torch.isclose(losses["loss_box"], torch.tensor(0.0), atol=1e-8)
    # confidence: responsible (0.5 - 1)^2; no-object: 0.5 * 0.5^2 * (2*49 - 1) predictors
    assert torch.isclose(losses["loss_obj"], torch.tensor(0.25))
    assert torch.isclose(losses["loss_noobj"], torch.tensor(0.5 * 0.25 * 97))
    # class: (1/3-0)^2 + (1/3-1)^2 + (1/3-0)^2 in the one object cell
    assert torch.isclose(losses["loss_cls"], torch.tensor(2 / 9 + 4 / 9))


def test_empty_and_mixed_batch_losses_finite():
    head = make_head()
    feats = {"c5": torch.randn(2, 16, 7, 7)}
    out = head(feats)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = head.loss(out, [empty, empty], [(224, 224)] * 2)
    assert losses["loss_box"] == 0 and losses["loss_cls"] == 0 and losses["loss_obj"] == 0
    assert torch.isfinite(losses["loss_noobj"]) and losses["loss_noobj"] > 0
    full = {"boxes": torch.tensor([[10.0, 10.0, 90.0, 60.0]]), "labels": torch.tensor([2])}
    losses = head.loss(out, [empty, full], [(224, 224)] * 2)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_box"] > 0


def test_crowd_is_not_assigned_and_not_negative():
    head = make_head()
    out = head({"c5": torch.randn(1, 16, 7, 7)})
    t = {"boxes": torch.tensor([[0.0, 0.0, 64.0, 64.0]]), "labels": torch.tensor([0]),
         "iscrowd": torch.tensor([True])}
    a = head.assign(out, [t])
    assert a["obj"].sum() == 0 and a["ignore"][0, :3, :3].all() and not a["ignore"][0, 3:, 3:].any()


def test_difficult_is_ignored_like_crowd():
    # the image's only box is VOC-difficult: no positive cell (loss_cls, loss_box, loss_obj 0) and
    # no no-object loss in the cells it covers
    head = make_head()
    out = head({"c5": torch.randn(1, 16, 7, 7)})
    t = {"boxes": torch.tensor([[0.0, 0.0, 64.0, 64.0]]), "labels": torch.tensor([1]),
         "difficult": torch.tensor([True])}
    a = head.assign(out, [t])
    assert a["obj"].sum() == 0 and a["ignore"][0, :3, :3].all() and not a["ignore"][0, 3:, 3:].any()
    losses = head.loss(out, [t], [(224, 224)])
    assert losses["loss_cls"] == 0 and losses["loss_box"] == 0 and losses["loss_obj"] == 0
    outside = ~a["ignore"][0]
    expected = head.lambda_noobj * (out["conf"][0] ** 2 * outside).sum()
    assert torch.isclose(losses["loss_noobj"], expected)


def test_training_lowers_loss_and_predict_finds_box():
    head = make_head()
    feats = {"c5": torch.randn(1, 16, 7, 7)}
    t = [{"boxes": torch.tensor([[32.0, 40.0, 120.0, 150.0]]), "labels": torch.tensor([2])}]
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss = sum(head.loss(head(feats), t, [(224, 224)]).values())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
    head.eval()
    det = head.predict(head(feats), [(224, 224)])[0]
    assert det["labels"][0] == 2
    assert box_iou(det["boxes"][:1], t[0]["boxes"])[0, 0] > 0.7


@pytest.mark.parametrize("bad", ["c9"])
def test_bad_in_feature(bad):
    with pytest.raises(ValueError, match="c9"):
        YOLOv1Head(input_shapes={"c5": ShapeSpec(8, 32)}, num_classes=2, in_feature=bad)


def test_shapes_config_builds_and_runs():
    from pathlib import Path

    from detkit.config import load_config
    from detkit.models import build_model
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs/yolov1/yolov1_d53tiny_shapes.yaml")
    model = build_model(cfg["model"])
    assert isinstance(model.head, YOLOv1Head) and model.head.stride == 16
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 128, 128)])
    assert out[0]["boxes"].shape[1] == 4
