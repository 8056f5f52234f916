"""MaskRoIHead on its own: mask targets (hand-computed 28 x 28 cases, torchvision's
project_masks_on_boxes), the paste (torchvision's paste_masks_in_image, image borders), the loss
(positives only, the ground-truth class channel, zero-positive images), a few steps that lower
it, and the detector's mask branch (only positive RoIs, clear error without masks)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image, project_masks_on_boxes

from detkit.models import build_model
from detkit.models.heads.mask_head import MaskRoIHead
from detkit.models.mask_paste import paste_masks
from detkit.models.mask_targets import positive_rois, project_masks
from detkit.structures import ShapeSpec

SHAPES = {"p2": ShapeSpec(8, 4), "p3": ShapeSpec(8, 8)}


def _polygon_mask(polygon: list[float], height: int = 64, width: int = 64) -> torch.Tensor:
    """Bool[H,W] of a COCO polygon, rasterised by pycocotools as the COCO loader does."""
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
    return torch.from_numpy(mask_utils.decode(rle).astype(bool))


def test_mask_target_of_a_square_is_exact():
    # Polygon 10..38 x 20..48 covers pixels 10..37 x 20..47; the RoI is the same square. With
    # aligned=False, target pixel j samples at 10 + j + 0.5, halfway between mask pixels 10 + j
    # and 11 + j: 1 inside, 0.5 on the last row / column (pixel 38 / 48 is outside), 0.25 corner.
    mask = _polygon_mask([10, 20, 38, 20, 38, 48, 10, 48])
    assert mask.sum() == 28 * 28 and mask[20:48, 10:38].all()
    target = project_masks(mask[None], torch.tensor([[10.0, 20.0, 38.0, 48.0]]), torch.tensor([0]), 28)
    edge = torch.ones(28)
    edge[-1] = 0.5
    assert torch.equal(target[0], edge[:, None] * edge[None, :])


def test_mask_target_of_a_triangle_is_exact():
    # The triangle (10,20)-(38,20)-(38,48) rasterises to pixels x in [y - 9, 37] for y = 20..46.
    mask = _polygon_mask([10, 20, 38, 20, 38, 48])
    inside = np.zeros((29, 29))   # inside[i, j]: mask pixel (x = 10 + j, y = 20 + i), one extra row/col
    for i in range(27):
        inside[i, i + 1:28] = 1
    assert torch.equal(mask[20:49, 10:39], torch.from_numpy(inside.astype(bool)))
    expected = (inside[:-1, :-1] + inside[:-1, 1:] + inside[1:, :-1] + inside[1:, 1:]) / 4
    target = project_masks(mask[None], torch.tensor([[10.0, 20.0, 38.0, 48.0]]), torch.tensor([0]), 28)
    assert torch.equal(target[0], torch.from_numpy(expected).float())


def test_mask_targets_equal_torchvision_project_masks_on_boxes():
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(3, 50, 70, generator=g) > 0.5
    xy = torch.rand(20, 2, generator=g) * torch.tensor([60.0, 40.0]) - 5
    boxes = torch.cat([xy, xy + 2 + torch.rand(20, 2, generator=g) * 50], dim=1)
    index = torch.randint(0, 3, (20,), generator=g)
    expected = project_masks_on_boxes(gt.to(torch.uint8), boxes, index, 28)
    assert torch.equal(project_masks(gt, boxes, index, 28), expected)
    assert project_masks(gt, boxes[:0], index[:0], 28).shape == (0, 28, 28)


def _random_detections(num: int, height: int, width: int, seed: int = 0):
    """Mask probabilities and boxes clipped to the image as detections are (many touch a border)."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(num, 28, 28, generator=g)
    xy = torch.rand(num, 2, generator=g) * torch.tensor([width + 20.0, height + 20.0]) - 20
    boxes = torch.cat([xy, xy + 25 + torch.rand(num, 2, generator=g) * 70], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return probs, boxes


def test_paste_equals_torchvision_also_at_image_borders():
    probs, boxes = _random_detections(60, 70, 90)
    boxes = torch.cat([boxes, torch.tensor([[0.0, 0.0, 90.0, 70.0], [88.6, 3.0, 90.0, 4.1],
                                            [0.0, 0.0, 0.5, 0.4], [85.0, 60.0, 90.0, 70.0]])])
    probs = torch.cat([probs, torch.rand(4, 28, 28)])
    at_border = (boxes[:, :2] == 0) | (boxes[:, 2:] == torch.tensor([90.0, 70.0]))
    assert at_border.any(1).sum() > 20   # the enlarged paste boxes of these cross the border
    expected = paste_masks_in_image(probs[:, None], boxes, (70, 90))[:, 0]
    pasted = paste_masks(probs, boxes, (70, 90), threshold=None)
    assert pasted.shape == expected.shape and (pasted - expected).abs().max() <= 1e-6
    binary = paste_masks(probs, boxes, (70, 90))
    assert binary.dtype == torch.bool and torch.equal(binary, expected > 0.5)
    assert paste_masks(probs[:0], boxes[:0], (70, 90)).shape == (0, 70, 90)


def test_paste_of_boxes_outside_the_image_is_empty():
    # torchvision's loop fails on such boxes (negative slice ends); detections never have them,
    # but a user's boxes may: they paste nothing.
    boxes = torch.tensor([[-50.0, -40.0, -10.0, -5.0], [100.0, 10.0, 140.0, 30.0]])
    assert not paste_masks(torch.ones(2, 28, 28), boxes, (70, 90)).any()


def test_paste_of_a_full_mask_fills_its_box_to_the_border():
    # An all-ones mask over a box touching the right / bottom border: inside pixels are 1, the
    # bilinear fade of the zero padding stays within the enlarged box, nothing outside the image.
    box = torch.tensor([[40.0, 30.0, 64.0, 48.0]])
    pasted = paste_masks(torch.ones(1, 28, 28), box, (48, 64), threshold=None)[0]
    assert torch.equal(pasted[32:, 42:], torch.ones(16, 22))
    assert pasted[:28].abs().sum() == 0 and pasted[:, :38].abs().sum() == 0


def _head(**kwargs) -> MaskRoIHead:
    torch.manual_seed(0)
    return MaskRoIHead(input_shapes=SHAPES, num_classes=3, conv_dim=8, **kwargs)


def _features():
    g = torch.Generator().manual_seed(1)
    return {"p2": torch.randn(1, 8, 16, 16, generator=g), "p3": torch.randn(1, 8, 8, 8, generator=g)}


def test_loss_uses_the_positive_rois_ground_truth_class_channel():
    samples = [{"labels": torch.tensor([3, 1, 3, 0]), "gt_index": torch.tensor([-1, 1, -1, 0])}]
    rois = [torch.tensor([[0.0, 0, 9, 9], [4, 4, 40, 30], [1, 1, 5, 5], [10, 8, 60, 50]])]
    positives = positive_rois(rois, samples, num_classes=3)
    assert torch.equal(positives[0]["labels"], torch.tensor([1, 0]))      # background (3) dropped
    assert torch.equal(positives[0]["boxes"], rois[0][[1, 3]])
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 10:50, 12:58] = True
    masks[1, 6:28, 5:36] = True
    targets = [{"boxes": torch.tensor([[12.0, 10, 58, 50], [5, 6, 36, 28]]), "masks": masks}]
    head = _head()
    logits = head(_features(), [positives[0]["boxes"]], [(64, 64)])
    assert logits.shape == (2, 3, 28, 28)
    loss = head.loss(logits, positives, targets)["loss_mask"]
    wanted = project_masks(masks, positives[0]["boxes"], positives[0]["gt_index"], 28)
    chosen = torch.stack([logits[0, 1], logits[1, 0]])
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(chosen, wanted))
    other = logits.clone().detach()
    other[0, [0, 2]] += 5.0           # other classes' channels do not matter
    other[1, [1, 2]] -= 5.0
    assert torch.allclose(head.loss(other, positives, targets)["loss_mask"], loss.detach())


def test_zero_positive_images_give_a_finite_zero_mask_loss_with_a_graph():
    head = _head()
    positives = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                  "gt_index": torch.zeros(0, dtype=torch.int64)}]
    logits = head(_features(), [positives[0]["boxes"]], [(64, 64)])
    targets = [{"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 64, 64, dtype=torch.bool)}]
    loss = head.loss(logits, positives, targets)["loss_mask"]
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert head.logits.weight.grad is not None and head.logits.weight.grad.abs().sum() == 0


def test_missing_or_misaligned_masks_are_clear_errors():
    head = _head()
    positives = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                  "gt_index": torch.zeros(0, dtype=torch.int64)}]
    logits = torch.zeros(0, 3, 28, 28)
    with pytest.raises(ValueError, match="no 'masks'.*instance_masks: true.*VOC"):
        head.loss(logits, positives, [{"boxes": torch.zeros(2, 4), "image_id": 7}])
    with pytest.raises(ValueError, match="one mask per box"):
        head.loss(logits, positives, [{"boxes": torch.zeros(2, 4), "masks": torch.zeros(3, 8, 8)}])


def test_a_few_steps_lower_the_mask_loss():
    head = _head()
    features = _features()
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 12:44, 20:36] = True
    positives = [{"boxes": torch.tensor([[16.0, 8, 40, 48], [18, 10, 38, 46]]),
                  "labels": torch.tensor([2, 2]), "gt_index": torch.tensor([0, 0])}]
    targets = [{"boxes": torch.tensor([[20.0, 12, 36, 44]]), "masks": masks}]
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = head.loss(head(features, [positives[0]["boxes"]], [(64, 64)]), positives, targets)["loss_mask"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_untrained_mask_branch_predicts_one_half():
    # The logits layer starts at N(0, 0.001^2) (Detectron2): loss_mask = ln 2 and tiny gradients
    # into the shared features. With He init the loss started near 3.4 with feature gradients ~30x
    # the box losses', which slowed the box/RPN learning of an AdamW run (shapes bbox AP50 0.76).
    torch.manual_seed(0)
    head = MaskRoIHead(input_shapes=SHAPES, num_classes=3, canonical_scale=32, conv_dim=64)
    features = {k: v.requires_grad_() for k, v in _features().items()}
    boxes = torch.tensor([[4.0, 4, 40, 30], [10, 8, 60, 50], [0, 0, 20, 20]])
    positives = [{"boxes": boxes, "labels": torch.tensor([0, 1, 2]), "gt_index": torch.tensor([0, 1, 1])}]
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 6:28, 5:36] = True
    masks[1, 10:50, 12:58] = True
    logits = head(features, [boxes], [(64, 64)])
    assert logits.abs().max() < 0.05
    loss = head.loss(logits, positives, [{"boxes": boxes[:2], "masks": masks}])["loss_mask"]
    assert abs(loss.item() - np.log(2)) < 0.01
    loss.backward()
    assert max(f.grad.abs().max().item() for f in features.values()) < 1e-3


def test_predict_takes_the_detected_class_and_paste_binarises():
    head = _head()
    logits = torch.zeros(2, 3, 28, 28)
    logits[0, 2] = 4.0        # detection 0 is class 2: its channel says "inside"
    logits[1, 0] = -4.0       # detection 1 is class 0: "outside"
    detections = [{"boxes": torch.tensor([[2.0, 2, 20, 20], [5, 5, 30, 30]]), "labels": torch.tensor([2, 0]),
                   "scores": torch.tensor([0.9, 0.8])}]
    out = head.predict(logits, detections)[0]
    assert torch.allclose(out["mask_probs"][0], torch.sigmoid(torch.tensor(4.0)).expand(28, 28))
    pasted = head.paste(out, (32, 40))
    assert "mask_probs" not in pasted and pasted["masks"].shape == (2, 32, 40)
    assert pasted["masks"][0, 4:19, 4:19].all() and not pasted["masks"][1].any()


TINY = {"type": "TwoStageDetector", "num_classes": 3,
        "backbone": {"type": "ResNet", "depth": 18, "out_features": ["c4"]},
        "rpn": {"type": "RPNHead", "anchor_sizes": [[16, 32, 64]], "pre_nms_topk_train": 100,
                "post_nms_topk_train": 30, "pre_nms_topk_test": 50, "post_nms_topk_test": 20},
        "roi_head": {"type": "RoIHead", "batch_size_per_image": 16,
                     "box_head": {"type": "TwoMLPHead", "fc_dim": 16}},
        "mask_head": {"type": "MaskRoIHead", "conv_dim": 8, "num_conv": 1}}


def test_detector_trains_the_mask_head_on_positive_rois_only():
    torch.manual_seed(0)
    model = build_model(TINY)
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[0, 10:50, 8:40] = True
    masks[1, 20:60, 50:90] = True
    targets = [{"boxes": torch.tensor([[8.0, 10, 40, 50], [50, 20, 90, 60]]), "labels": torch.tensor([0, 2]),
                "masks": masks},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, 64, 96, dtype=torch.bool)}]
    seen = []
    hook = model.mask_head.register_forward_pre_hook(lambda mod, args: seen.append(args[1]))
    sampled = []
    original = model.roi_head.sample_proposals
    model.roi_head.sample_proposals = lambda *a: sampled.append(original(*a)) or sampled[-1]
    try:
        losses = model([torch.rand(3, 64, 96), torch.rand(3, 64, 96)], targets)
    finally:
        hook.remove()
    num_fg = [int((s["labels"] < 3).sum()) for s in sampled[0][1]]
    assert [b.shape[0] for b in seen[0]] == num_fg and num_fg[0] > 0 and num_fg[1] == 0
    assert torch.isfinite(losses["loss_mask"]) and losses["loss_mask"].item() > 0
    model.eval()
    with torch.no_grad():
        result = model([torch.rand(3, 64, 96)], [{"orig_size": torch.tensor([128, 192]),
                                                  "scale": torch.tensor([0.5, 0.5])}])[0]
    assert result["masks"].shape == (len(result["boxes"]), 128, 192) and result["masks"].dtype == torch.bool


def test_detector_without_masks_in_the_targets_is_a_clear_error():
    model = build_model(TINY)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": 3}
    with pytest.raises(ValueError, match="no 'masks'"):
        model([torch.rand(3, 64, 64)], [empty])


def test_empty_images_give_finite_losses_and_a_zero_mask_loss():
    torch.manual_seed(0)
    model = build_model(TINY)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 64, 96, dtype=torch.bool)}
    losses = model([torch.rand(3, 64, 96)] * 2, [empty, empty])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"].item() == 0.0 and losses["loss_box"].item() == 0.0


def test_no_detections_give_empty_masks_of_the_image_size():
    torch.manual_seed(0)
    model = build_model(dict(TINY, roi_head=dict(TINY["roi_head"], score_thresh=1.0))).eval()
    with torch.no_grad():
        results = model([torch.rand(3, 64, 96), torch.rand(3, 50, 70)],
                        [{"orig_size": torch.tensor([128, 192])}, {}])
    assert [tuple(r["masks"].shape) for r in results] == [(0, 128, 192), (0, 50, 70)]
