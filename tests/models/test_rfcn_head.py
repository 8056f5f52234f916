"""R-FCN: position-sensitive pooling picks the right channel group, voting, OHEM, losses."""

import pytest
import torch
import torch.nn.functional as F

from detkit.models.heads.rfcn_head import RFCNHead, position_sensitive_vote
from detkit.structures import ShapeSpec

K = 3  # group size


def test_constant_maps_pick_each_bins_channel_group():
    # channel c is the constant c: bin (i, j) of output o must read channel (o * k + i) * k + j
    outputs = 2
    maps = torch.arange(outputs * K * K, dtype=torch.float32).view(1, -1, 1, 1).expand(1, -1, 12, 12).contiguous()
    rois = [torch.tensor([[0.0, 0.0, 12.0, 12.0], [3.0, 2.0, 9.0, 11.0]])]
    from torchvision.ops import ps_roi_pool
    pooled = ps_roi_pool(maps, rois, K, 1.0)
    for o in range(outputs):
        for i in range(K):
            for j in range(K):
                assert torch.all(pooled[:, o, i, j] == (o * K + i) * K + j)
    # voting averages the k*k bins: mean of channels o*9 .. o*9+8
    votes = position_sensitive_vote(maps, rois, K, 1.0)
    assert torch.allclose(votes, torch.tensor([[4.0, 13.0], [4.0, 13.0]]))


def test_position_sensitivity_localises_the_object():
    # a "left-top part" detector channel group fires only on the left-top of the object
    maps = torch.zeros(1, 1 * K * K, 9, 9)
    maps[0, 0, 0:3, 0:3] = 9.0          # channel group (0, 0) active in the top-left 3x3 cells
    aligned_roi = [torch.tensor([[0.0, 0.0, 9.0, 9.0]])]
    shifted_roi = [torch.tensor([[3.0, 3.0, 9.0, 9.0]])]
    assert position_sensitive_vote(maps, aligned_roi, K, 1.0).item() == pytest.approx(1.0)
    assert position_sensitive_vote(maps, shifted_roi, K, 1.0).item() == pytest.approx(0.0)


def make_head(**kw):
    torch.manual_seed(0)
    return RFCNHead(input_shapes={"c5": ShapeSpec(16, 8)}, num_classes=3, reduced_channels=8,
                    group_size=K, batch_size_per_image=32, **kw)


def test_forward_shapes_and_empty_image_losses():
    head = make_head()
    feats = {"c5": torch.randn(2, 16, 16, 16)}
    proposals = [torch.tensor([[10.0, 10.0, 60.0, 70.0], [0.0, 0.0, 30.0, 30.0]]), torch.tensor([[5.0, 5.0, 50.0, 50.0]])]
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    rois, samples = head.sample_proposals(proposals, [empty, empty])
    out = head(feats, rois, [(128, 128)] * 2)
    assert out["class_logits"].shape == (3, 4) and out["box_deltas"].shape == (3, 4)
    losses = head.loss(out, samples)
    assert torch.isfinite(losses["loss_cls"]) and losses["loss_box"] == 0
    # the loss on an all-background batch is cross-entropy towards the background class (index C)
    expected = F.cross_entropy(out["class_logits"], torch.full((3,), 3))
    assert torch.isclose(losses["loss_cls"], expected)


def test_ohem_keeps_the_hardest_rois_per_image():
    head = make_head(ohem=True, ohem_batch_size=2, ohem_nms_thresh=1.0)
    target = {"boxes": torch.tensor([[8.0, 8.0, 64.0, 64.0]]), "labels": torch.tensor([1])}
    proposals = [torch.tensor([[8.0, 8.0, 64.0, 64.0], [60.0, 60.0, 120.0, 120.0], [0.0, 70.0, 40.0, 120.0],
                               [70.0, 0.0, 120.0, 40.0]])]
    rois, samples = head.sample_proposals(proposals, [target])
    assert len(rois[0]) == 5  # OHEM scores every proposal (+ the ground truth)
    out = head({"c5": torch.randn(1, 16, 16, 16)}, rois, [(128, 128)])
    per_roi = head.per_roi_loss(out, samples)
    hardest = torch.topk(per_roi, 2).values
    losses = head.loss(out, samples)
    # with NMS off, the selected RoIs are exactly the two highest-loss ones
    labels = samples[0]["labels"]
    keep = torch.topk(per_roi, 2).indices
    ce = F.cross_entropy(out["class_logits"][keep], labels[keep])
    assert torch.isclose(losses["loss_cls"], ce)
    assert hardest.min() >= per_roi.median()


def test_training_lowers_loss():
    head = make_head()
    feats = {"c5": torch.randn(1, 16, 16, 16)}
    target = {"boxes": torch.tensor([[16.0, 16.0, 80.0, 72.0]]), "labels": torch.tensor([2])}
    proposals = [torch.tensor([[12.0, 20.0, 84.0, 70.0], [0.0, 0.0, 40.0, 40.0], [64.0, 64.0, 127.0, 127.0]])]
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    torch.manual_seed(1)
    first = None
    for _ in range(40):
        rois, samples = head.sample_proposals(proposals, [target])
        loss = sum(head.loss(head(feats, rois, [(128, 128)]), samples).values())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
    head.eval()
    det = head.predict(head(feats, proposals, [(128, 128)]), [(128, 128)])[0]
    assert det["labels"][0] == 2


def test_bad_in_feature():
    with pytest.raises(ValueError, match="c9"):
        RFCNHead(input_shapes={"c5": ShapeSpec(8, 16)}, num_classes=2, in_feature="c9")


def test_border_rois_get_empty_bins_with_pooling_but_not_with_align():
    """Why the shapes config sets align: PS-RoI pooling rounds a RoI at the bottom/right border
    of a coarse map past its last cell, its bins come out empty and vote 0 for every class
    (uniform scores); PS-RoIAlign samples every bin bilinearly inside the map."""
    maps = torch.rand(1, 2 * K * K, 16, 16) + 1.0       # every value >= 1
    border = [torch.tensor([[120.0, 120.0, 127.0, 127.0]])]  # last 7 px of a 128-px image, stride 8
    pooled = position_sensitive_vote(maps, border, K, 1 / 8)
    aligned = position_sensitive_vote(maps, border, K, 1 / 8, align=True)
    assert torch.equal(pooled, torch.zeros_like(pooled))
    assert aligned.min() >= 1.0
