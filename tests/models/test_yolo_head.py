"""YOLOHead on fake feature dicts: shapes, loss values by hand, empty / mixed / crowd batches,
predict round trip, inference caps, config errors, and a few optimisation steps."""

import math

import pytest
import torch
from torchvision.ops import box_iou

from detkit.models.heads.yolo_head import YOLOHead
from detkit.models.yolo_targets import assign_anchors, encode_boxes
from detkit.registry import HEADS, ConfigError
from detkit.structures import ShapeSpec

SHAPES = {"p3": ShapeSpec(8, 8), "p4": ShapeSpec(16, 16), "p5": ShapeSpec(16, 32)}
SMALL_ANCHORS = [[[6, 6], [10, 14]], [[20, 16], [24, 36]], [[40, 40], [60, 50]]]
SIZE = 64



def make_head(**kw):
    kw.setdefault("anchors", SMALL_ANCHORS)
    return YOLOHead(input_shapes=SHAPES, num_classes=3, **kw)


def features(batch=2, size=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(batch, s.channels, size // s.stride, size // s.stride, generator=g)
            for k, s in SHAPES.items()}


def zero_outputs(head, batch=1, size=SIZE):
    return [torch.zeros(batch, head.num_anchors, size // s, size // s, 5 + head.num_classes,
                        requires_grad=True) for s in head.strides]


def target(boxes, labels, **extra):
    t = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
         "labels": torch.tensor(labels, dtype=torch.long)}
    t.update({k: torch.tensor(v) for k, v in extra.items()})
    return t


EMPTY = target([], [])


def anchor_boxes(head):
    """Float[P,4]: what zero raw outputs decode to (each anchor centred in its cell), in P order."""
    boxes = []
    for level, s in enumerate(head.strides):
        for aw, ah in SMALL_ANCHORS[level]:
            for row in range(SIZE // s):
                for col in range(SIZE // s):
                    cx, cy = (col + 0.5) * s, (row + 0.5) * s
                    boxes.append([cx - aw / 2, cy - ah / 2, cx + aw / 2, cy + ah / 2])
    return torch.tensor(boxes)


def test_output_shapes():
    head = make_head()
    out = head(features(batch=2))
    assert [tuple(o.shape) for o in out] == [(2, 2, 8, 8, 8), (2, 2, 4, 4, 8), (2, 2, 2, 2, 8)]
    # the objectness bias starts at logit(0.01)
    assert torch.allclose(head.predictors[0].bias.view(2, 8)[:, 4], torch.full((2,), math.log(0.01 / 0.99)))


def test_loss_values_by_hand_with_zero_outputs():
    """All raw outputs 0: sigmoid = 0.5 everywhere, decoded boxes are the anchors at cell centres."""
    head = make_head()
    # 22x24 at (24, 24): shape IoU (24,36) 528/864 = 0.61 beats (20,16) 320/528 = 0.606, so the
    # positive is level 1, anchor 1, cell (1, 1); the (20,16) anchor there has IoU 0.606 > 0.5
    box = [13.0, 12.0, 35.0, 36.0]
    outs = zero_outputs(head)
    losses = head.loss(outs, [target([box], [2])], [(SIZE, SIZE)])
    scale = 2 - (22 * 24) / (SIZE * SIZE)
    # xy: BCE(logit 0, t) = log 2 for any target t; wh: (0 - log(w/aw))^2
    assert losses["loss_xy"].item() == pytest.approx(2 * math.log(2) * scale, rel=1e-5)
    wh = (math.log(22 / 24) ** 2 + math.log(24 / 36) ** 2) * scale
    assert losses["loss_wh"].item() == pytest.approx(wh, rel=1e-5)
    assert losses["loss_cls"].item() == pytest.approx(3 * math.log(2), rel=1e-5)
    # objectness: log 2 for every prediction except ignored negatives (anchor box IoU > 0.5 with gt)
    ious = box_iou(anchor_boxes(head), torch.tensor([box]))[:, 0]
    positive = 8 * 8 * 2 + (1 * 4 + 1) * 4 + 1
    counted = ious <= 0.5
    counted[positive] = True                 # positives always count (target 1)
    assert (~counted).sum() >= 1              # some negatives are ignored in this example
    counted = counted.sum().item()
    assert losses["loss_obj"].item() == pytest.approx(counted * math.log(2), rel=1e-5)


def test_l1_and_giou_switch():
    box = [[10.0, 12.0, 30.0, 52.0]]          # 20x40: anchor (24,36) level 1
    outs = zero_outputs(make_head())
    l1 = make_head(box_loss="l1").loss(outs, [target(box, [0])], [(SIZE, SIZE)])
    scale = 2 - 800 / SIZE ** 2
    assert l1["loss_wh"].item() == pytest.approx((abs(math.log(20 / 24)) + abs(math.log(40 / 36))) * scale,
                                                  rel=1e-5)
    giou = make_head(box_loss="giou").loss(outs, [target(box, [0])], [(SIZE, SIZE)])
    assert set(giou) == {"loss_giou", "loss_obj", "loss_cls"}
    # decoded box: 24x36 anchor at the centre of cell (1,2) of stride 16 = (24, 40); gt (20, 32)
    pred = torch.tensor([[12.0, 22.0, 36.0, 58.0]])
    inter = (30 - 12) * (52 - 22)
    union = 24 * 36 + 20 * 40 - inter
    hull = (36 - 10) * (58 - 12)
    expected = 1 - (inter / union - (hull - union) / hull)
    assert giou["loss_giou"].item() == pytest.approx(expected * scale, rel=1e-5)
    assert box_iou(pred, torch.tensor(box)).item() == pytest.approx(inter / union)


@pytest.mark.parametrize("box_loss", ["mse", "l1", "giou"])
def test_empty_images_finite_with_zero_box_and_class_terms(box_loss):
    head = make_head(box_loss=box_loss)
    outs = head(features(batch=2))
    losses = head.loss(outs, [EMPTY, EMPTY], [(SIZE, SIZE)] * 2)
    for name, value in losses.items():
        assert torch.isfinite(value), name
        if name != "loss_obj":
            assert value.item() == 0.0, name
    assert losses["loss_obj"].item() > 0
    sum(losses.values()).backward()
    grads = [p.grad for p in head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_mixed_batch_equals_mean_of_single_images():
    """Per-image normalisation: the batch loss is the mean of the one-image losses."""
    head = make_head()
    t_full = target([[5.0, 5.0, 17.0, 20.0], [30.0, 28.0, 62.0, 60.0]], [0, 1])
    feats = features(batch=2, seed=3)
    batch = head.loss(head(feats), [t_full, EMPTY], [(SIZE, SIZE)] * 2)
    one = head.loss(head({k: v[:1] for k, v in feats.items()}), [t_full], [(SIZE, SIZE)])
    two = head.loss(head({k: v[1:] for k, v in feats.items()}), [EMPTY], [(SIZE, SIZE)])
    for k in batch:
        assert batch[k].item() == pytest.approx((one[k].item() + two[k].item()) / 2, rel=1e-5)
    assert one["loss_cls"] > 0 and two["loss_cls"] == 0


def test_crowd_and_difficult_boxes_are_never_positive_and_mask_objectness():
    head = make_head()
    outs = zero_outputs(head)
    left = [[0.0, 0.0, 32.0, 64.0]]
    crowd = head.loss(outs, [target(left, [0], iscrowd=[True])], [(SIZE, SIZE)])
    assert crowd["loss_xy"] == 0 and crowd["loss_cls"] == 0
    # predictions with more than half of their area in the crowd region lose their objectness loss
    preds = anchor_boxes(head)
    lt = torch.maximum(preds[:, :2], torch.tensor([0.0, 0.0]))
    rb = torch.minimum(preds[:, 2:], torch.tensor([32.0, 64.0]))
    ioa = (rb - lt).clamp(min=0).prod(-1) / (preds[:, 2:] - preds[:, :2]).prod(-1)
    kept = (ioa <= 0.5).sum().item()
    assert 0 < kept < len(preds)
    assert crowd["loss_obj"].item() == pytest.approx(kept * math.log(2), rel=1e-5)
    difficult = head.loss(outs, [target(left, [0], difficult=[True])], [(SIZE, SIZE)])
    assert difficult["loss_obj"].item() == pytest.approx(crowd["loss_obj"].item())
    # a normal box next to a crowd box still trains
    mixed = head.loss(outs, [target([[40.0, 22.0, 60.0, 38.0]] + left, [2, 0], iscrowd=[False, True])],
                      [(SIZE, SIZE)])
    assert mixed["loss_cls"].item() == pytest.approx(3 * math.log(2), rel=1e-5)


def _outputs_encoding(head, boxes, labels, size):
    """Raw outputs that the head should decode to exactly ``boxes`` (logits of the targets)."""
    outs = [o.detach().fill_(-12.0) for o in zero_outputs(head, size=size)]
    priors = head.priors(outs)
    flat = torch.cat([o.view(-1, o.shape[-1]) for o in outs])   # a view per level, written below
    for b, label in zip(boxes, labels):
        i = assign_anchors(b[None], priors).pred_index
        off, lwh = encode_boxes(b[None], priors.cells[i], priors.strides[i], priors.anchor_wh[i])
        flat[i, :2] = torch.logit(off.clamp(1e-6, 1 - 1e-6))
        flat[i, 2:4] = lwh
        flat[i, 4] = 12.0
        flat[i, 5 + label] = 12.0
    sizes = [o[0, ..., 0].numel() for o in outs]
    return [f.view_as(o) for f, o in zip(flat.split(sizes), outs)]


def test_predict_decodes_encoded_targets_back():
    head = make_head()
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [40.0, 44.0, 64.0, 64.0], [2.0, 10.0, 62.0, 60.0],
                          [20.0, 20.0, 41.0, 37.0]])
    labels = [0, 2, 1, 2]
    outs = _outputs_encoding(head, boxes, labels, SIZE)
    pred = head.predict(outs, [(SIZE, SIZE)])[0]
    assert len(pred["boxes"]) == 4
    order = box_iou(boxes, pred["boxes"]).argmax(1)
    assert (box_iou(boxes, pred["boxes"][order]).diagonal() > 0.99).all()
    assert pred["labels"][order].tolist() == labels
    assert (pred["scores"] > 0.99).all()


def test_predict_caps_and_thresholds():
    head = make_head(max_dets=7, pre_nms_topk=20, nms_thr=1.0)
    outs = head(features(batch=2))
    for o in outs:
        o.data[..., 4:] = 0.0            # every score 0.25: far more candidates than the caps
    res = head.predict(outs, [(SIZE, SIZE), (40, 50)])
    assert [len(r["boxes"]) for r in res] == [7, 7]
    assert res[1]["boxes"][:, 2].max() <= 50 and res[1]["boxes"][:, 3].max() <= 40
    assert res[0]["labels"].dtype == torch.int64
    head.score_thr = 0.3
    empty = head.predict(outs, [(SIZE, SIZE)] * 2)[0]
    assert empty["boxes"].shape == (0, 4) and empty["scores"].shape == (0,)


def test_nms_is_per_class():
    head = make_head()
    boxes = torch.tensor([[20.0, 20.0, 41.0, 37.0]])
    outs = _outputs_encoding(head, boxes, [1], SIZE)
    flat_p4 = outs[1].view(-1, 8)
    hot = flat_p4[:, 4].argmax()
    flat_p4[hot, 5:] = 12.0               # the same box scores high for all three classes
    pred = head.predict(outs, [(SIZE, SIZE)])[0]
    assert sorted(pred["labels"].tolist()) == [0, 1, 2]


def test_bridge_convs_and_build_errors():
    head = HEADS.build({"type": "YOLOHead", "anchors": SMALL_ANCHORS, "feat_channels": 12},
                       "model.head", input_shapes=SHAPES, num_classes=2)
    assert head.predictors[0].in_channels == 12
    assert [tuple(o.shape) for o in head(features(batch=1))][0] == (1, 2, 8, 8, 7)
    with pytest.raises(ConfigError, match="model.head.*box_loss"):
        HEADS.build({"type": "YOLOHead", "box_loss": "iou"}, "model.head", input_shapes=SHAPES,
                    num_classes=2)
    with pytest.raises(ConfigError, match="model.head.*anchors has 2 levels"):
        HEADS.build({"type": "YOLOHead", "anchors": SMALL_ANCHORS[:2]}, "model.head",
                    input_shapes=SHAPES, num_classes=2)
    with pytest.raises(ConfigError, match="p6"):
        HEADS.build({"type": "YOLOHead", "in_features": ["p4", "p5", "p6"]}, "model.head",
                    input_shapes=SHAPES, num_classes=2)


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    head = make_head()
    feats = features(batch=2, seed=1)
    targets = [target([[5.0, 5.0, 17.0, 20.0], [30.0, 28.0, 62.0, 60.0]], [0, 1]), EMPTY]
    opt = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(30):
        losses = head.loss(head(feats), targets, [(SIZE, SIZE)] * 2)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(total.item())
    assert history[-1] < 0.5 * history[0]


def test_loss_is_float32_under_half_outputs():
    head = make_head()
    outs = [o.half() for o in head(features(batch=1))]
    losses = head.loss(outs, [target([[5.0, 5.0, 17.0, 20.0]], [0])], [(SIZE, SIZE)])
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_predict_matches_brute_force_reference():
    """Ranking predictions before pairs is exact: same result as scoring all P x C pairs."""
    from torchvision.ops import batched_nms, clip_boxes_to_image

    from detkit.models.yolo_targets import decode_boxes

    torch.manual_seed(0)
    head = YOLOHead(input_shapes=SHAPES, num_classes=20, anchors=SMALL_ANCHORS, pre_nms_topk=150)
    for _ in range(3):
        outs = [torch.randn(1, 2, 128 // s, 128 // s, 25) * 2 for s in head.strides]
        got = head.predict(outs, [(128, 120)])[0]
        raw, pr = torch.cat([o.reshape(-1, 25) for o in outs]), head.priors(outs)
        scores = (raw[:, 4:5].sigmoid() * raw[:, 5:].sigmoid()).flatten()
        cand = (scores > head.score_thr).nonzero().squeeze(1)
        assert len(cand) > 150
        cand = cand[scores[cand].topk(150).indices]
        p, labels = cand // 20, cand % 20
        boxes = decode_boxes(raw[p, :2].sigmoid(), raw[p, 2:4], pr.cells[p], pr.strides[p], pr.anchor_wh[p])
        boxes = clip_boxes_to_image(boxes, (128, 120))
        keep = batched_nms(boxes, scores[cand], labels, 0.45)[:100]
        assert torch.equal(got["labels"], labels[keep])
        assert torch.allclose(got["scores"], scores[cand][keep])
        assert torch.allclose(got["boxes"], boxes[keep])
