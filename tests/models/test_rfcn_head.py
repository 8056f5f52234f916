"""R-FCN: position-sensitive pooling picks the right channel group, voting, OHEM, losses."""

import math

import pytest
import torch
import torch.nn.functional as F

from detkit.models.heads.rfcn_head import RFCNHead, position_sensitive_vote
from detkit.models.ps_roi_pool import ps_roi_avg_pool
from detkit.structures import ShapeSpec

K = 3  # group size


def test_constant_maps_pick_each_bins_channel_group():
    # channel c is the constant c: bin (i, j) of output o must read channel (o * k + i) * k + j
    outputs = 2
    maps = torch.arange(outputs * K * K, dtype=torch.float32).view(1, -1, 1, 1).expand(1, -1, 12, 12)
    rois = [torch.tensor([[0.0, 0.0, 12.0, 12.0], [3.0, 2.0, 9.0, 11.0]])]
    pooled = ps_roi_avg_pool(maps, rois, K, 1.0)
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
    proposals = [torch.tensor([[10.0, 10.0, 60.0, 70.0], [0.0, 0.0, 30.0, 30.0]]),
                 torch.tensor([[5.0, 5.0, 50.0, 50.0]])]
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


def test_border_rois_vote_like_any_other_roi():
    """The paper's pooling reads the last row and column (torchvision's ps_roi_pool does not:
    its bins are clipped to end at H - 1, so these RoIs voted 0 for every class)."""
    ones = torch.ones(1, 2 * K * K, 16, 16)
    last_cell = [torch.tensor([[120.0, 120.0, 128.0, 128.0], [121.0, 3.0, 127.0, 127.0]])]  # stride 8
    assert torch.equal(position_sensitive_vote(ones, last_cell, K, 1 / 8), torch.ones(2, 2))
    maps = torch.rand(1, 2 * K * K, 16, 16) + 1.0       # every value >= 1
    border = [torch.tensor([[120.0, 120.0, 127.0, 127.0]])]
    assert position_sensitive_vote(maps, border, K, 1 / 8).min() >= 1.0
    assert position_sensitive_vote(maps, border, K, 1 / 8, align=True).min() >= 1.0


def test_border_region_mean_hand_computed():
    # k = 1: the vote is the mean of the RoI's cells; bottom-right 2 x 2 cells 1, 1, 1, 0
    maps = torch.zeros(1, 1, 4, 4)
    maps[0, 0, 2:, 2:] = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert position_sensitive_vote(maps, [torch.tensor([[2.0, 2.0, 4.0, 4.0]])], 1, 1.0).item() == 0.75
    # k = 2 on a 4 x 4 map with stride 2: bin (i, j) reads channel i * 2 + j over its 1 x 1 cell
    maps = torch.arange(4 * 16, dtype=torch.float32).view(1, 4, 4, 4)
    vote = position_sensitive_vote(maps, [torch.tensor([[4.0, 4.0, 8.0, 8.0]])], 2, 0.5)
    cells = [maps[0, 0, 2, 2], maps[0, 1, 2, 3], maps[0, 2, 3, 2], maps[0, 3, 3, 3]]
    assert vote.item() == pytest.approx(sum(c.item() for c in cells) / 4)


def test_pooling_equals_brute_force_bin_means_and_passes_gradcheck():
    torch.manual_seed(0)
    maps = torch.rand(2, 2 * K * K, 10, 12, dtype=torch.float64)
    rois = [torch.tensor([[3.0, 5.0, 40.0, 33.0], [70.0, 60.0, 96.0, 80.0]], dtype=torch.float64),
            torch.tensor([[88.0, 72.0, 96.0, 80.0], [0.0, 0.0, 96.0, 80.0]], dtype=torch.float64)]
    pooled = ps_roi_avg_pool(maps, rois, K, 1 / 8)
    for b, boxes in enumerate(rois):
        for r, (x0, y0, x1, y1) in enumerate((boxes / 8).tolist()):
            for i in range(K):
                for j in range(K):
                    rows = slice(math.floor(y0 + i * (y1 - y0) / K), math.ceil(y0 + (i + 1) * (y1 - y0) / K))
                    cols = slice(math.floor(x0 + j * (x1 - x0) / K), math.ceil(x0 + (j + 1) * (x1 - x0) / K))
                    for o in range(2):
                        expected = maps[b, (o * K + i) * K + j, rows, cols].mean()
                        assert pooled[b * 2 + r, o, i, j].item() == pytest.approx(expected.item(), abs=1e-12)



def test_pooling_gradcheck_with_border_rois():
    # torchvision's ps_roi_pool fails this: its backward does not clip bins as its forward does
    leaf = torch.rand(1, K * K, 5, 6, dtype=torch.float64, requires_grad=True)
    rois = [torch.tensor([[32.0, 24.0, 48.0, 40.0], [40.0, 32.0, 48.0, 40.0], [1.0, 2.0, 47.0, 39.0]],
                         dtype=torch.float64)]  # stride 8: the last 2 x 2 cells, the last cell, all
    assert torch.autograd.gradcheck(lambda x: ps_roi_avg_pool(x, rois, K, 1 / 8), (leaf,))


def test_pooling_input_errors():
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        ps_roi_avg_pool(torch.zeros(1, 10, 4, 4), [torch.zeros(1, 4)], K, 1.0)
    with pytest.raises(ValueError, match="Float\\[R, 5\\]"):
        ps_roi_avg_pool(torch.zeros(1, 9, 4, 4), torch.zeros(2, 4), K, 1.0)
