"""Multi-scale training and test-time augmentation (scales, flip, NMS / WBF merging)."""

import pytest
import torch

from detkit.models.detectors.base import Detector
from detkit.models.multiscale import MultiScaleTrain, TestTimeAug, flip_boxes, weighted_boxes_fusion


class BrightBoxDetector(Detector):
    """Toy detector: one box around the pixels brighter than the background (label 0).

    Its output depends on where the object is, so an un-flip or un-scale mistake moves the box.
    """

    def forward_test(self, batch):
        results = []
        for img, (h, w) in zip(batch.tensor, batch.image_sizes):
            mask = img[0, :h, :w] > img[0, :h, :w].mean() + 0.5
            ys, xs = torch.nonzero(mask, as_tuple=True)
            box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()[None]
            # a flip-asymmetric score so views differ: the fraction of the image left of the box
            results.append({"boxes": box, "scores": torch.tensor([0.5 + 0.4 * float(box[0, 0]) / w]),
                            "labels": torch.tensor([0])})
        return results


def image_with_box(h=60, w=90, box=(10, 20, 40, 35)):
    img = torch.zeros(3, h, w)
    x0, y0, x1, y1 = box
    img[:, y0:y1, x0:x1] = 1.0
    return img


def test_flip_boxes_is_an_involution_and_mirrors():
    boxes = torch.tensor([[10.0, 20.0, 40.0, 35.0]])
    assert torch.equal(flip_boxes(boxes, 90), torch.tensor([[50.0, 20.0, 80.0, 35.0]]))
    assert torch.equal(flip_boxes(flip_boxes(boxes, 90), 90), boxes)


def test_tta_single_scale_no_flip_equals_plain_inference():
    model = BrightBoxDetector(size_divisibility=32).eval()
    images = [image_with_box(), image_with_box(50, 70, (30, 5, 60, 25))]
    plain = model(images)
    model.test_time_aug = TestTimeAug(scales=[1.0], flip=False)
    tta = model(images)
    for a, b in zip(plain, tta):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


def test_flipped_view_is_unflipped():
    model = BrightBoxDetector(size_divisibility=1).eval()
    tta = TestTimeAug(scales=[1.0], flip=True, merge="nms")
    views = []

    def predict(batch):
        out = model.forward_test(model.preprocess(batch))
        views.append(out[0]["boxes"].clone())
        return out

    merged = tta(predict, [image_with_box()])[0]
    # the mirrored view saw the box at x 50..80; after un-flipping every view agrees on 10..40
    assert torch.equal(views[1], torch.tensor([[50.0, 20.0, 80.0, 35.0]]))
    assert torch.equal(merged["boxes"], torch.tensor([[10.0, 20.0, 40.0, 35.0]]))
    assert len(merged["boxes"]) == 1  # NMS merged the two identical views


def test_scaled_views_map_back():
    tta = {"scales": [0.5, 2.0], "merge": "wbf"}
    model = BrightBoxDetector(size_divisibility=1, test_time_aug=tta).eval()
    out = model([image_with_box()])[0]
    assert torch.allclose(out["boxes"], torch.tensor([[10.0, 20.0, 40.0, 35.0]]), atol=1.0)


def test_wbf_hand_computed():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0],
                          [0.0, 0.0, 10.0, 10.0]])
    scores = torch.tensor([0.9, 0.3, 0.8, 0.7])
    labels = torch.tensor([0, 0, 0, 1])
    fb, fs, fl = weighted_boxes_fusion(boxes, scores, labels, iou_thr=0.5, num_views=2)
    # cluster {0,1}: weighted mean (0.9*[0,0,10,10] + 0.3*[1,1,11,11]) / 1.2, score mean 0.6 * 2/2
    order = torch.argsort(fs, descending=True)
    fb, fs, fl = fb[order], fs[order], fl[order]
    assert torch.allclose(fb[0], torch.tensor([0.25, 0.25, 10.25, 10.25]))
    assert torch.isclose(fs[0], torch.tensor(0.6))
    # singletons are down-weighted by 1/num_views; class 1 never fuses with class 0
    assert torch.allclose(fs[1:], torch.tensor([0.4, 0.35]))
    assert fl.tolist() == [0, 0, 1]


def test_multiscale_train_resizes_batch_and_boxes():
    ms = MultiScaleTrain(short_edges=[30], max_size=1000, seed=0)
    img = image_with_box()  # 60 x 90
    t = {"boxes": torch.tensor([[10.0, 20.0, 40.0, 35.0]]), "labels": torch.tensor([0])}
    (out,), (tt,) = ms([img], [t])
    assert out.shape[-2:] == (30, 45)
    assert torch.allclose(tt["boxes"], torch.tensor([[5.0, 10.0, 20.0, 17.5]]))


def test_bad_merge_name():
    with pytest.raises(ValueError, match="merge"):
        TestTimeAug(merge="mean")


def test_multiscale_train_seed_per_rank_and_state_round_trip():
    from detkit.models.multiscale import MultiScaleTrain

    def draws(ms, n=12):
        return [ms.rng.choice(ms.short_edges) for _ in range(n)]

    a, b = MultiScaleTrain(short_edges=[32, 64, 96, 128]), MultiScaleTrain(short_edges=[32, 64, 96, 128])
    a.seed_for_rank(7, 0)
    b.seed_for_rank(7, 0)
    assert draws(a) == draws(b)
    b.seed_for_rank(7, 1)
    a.seed_for_rank(7, 0)
    assert draws(a, 40) != draws(b, 40)   # ranks draw different sizes
    state = a.state_dict()
    expected = draws(a)
    b.load_state_dict(state)
    assert draws(b) == expected
    fixed = MultiScaleTrain(short_edges=[32, 64], seed=3)   # an explicit seed wins over train.seed
    fixed.seed_for_rank(7, 0)
    assert draws(fixed) == draws(MultiScaleTrain(short_edges=[32, 64], seed=3))
