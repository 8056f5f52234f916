"""SPP-net pooling: fixed output length for any size, and the paper's max-pool bins by hand."""

import pytest
import torch

from detkit.models.spp_pool import SpatialPyramidPool, SPPRoIPool, fpn_level_of_boxes


@pytest.mark.parametrize("size", [(5, 7), (13, 13), (32, 20)])
def test_output_length_is_fixed(size):
    spp = SpatialPyramidPool(bins=[1, 2, 4])
    out = spp(torch.randn(2, 6, *size))
    assert out.shape == (2, 6 * (1 + 4 + 16)) == (2, spp.output_dim(6))


def test_matches_hand_computed_max_pool():
    x = torch.arange(16.0).view(1, 1, 4, 4)  # rows 0..3 of [4r, 4r+1, 4r+2, 4r+3]
    out = SpatialPyramidPool(bins=[1, 2])(x)[0]
    # 1x1 bin: max 15; 2x2 bins: maxima of the four 2x2 quadrants
    assert out.tolist() == [15.0, 5.0, 7.0, 13.0, 15.0]
    odd = torch.tensor([[1.0, 9.0, 2.0], [3.0, 4.0, 8.0], [7.0, 0.0, 5.0]]).view(1, 1, 3, 3)
    # 2x2 bins on 3x3: windows rows/cols [0,2) and [1,3) (floor/ceil), overlapping in the middle
    assert SpatialPyramidPool(bins=[2])(odd)[0].tolist() == [9.0, 9.0, 7.0, 8.0]


def test_roi_pool_fixed_length_and_values():
    feat = torch.arange(64.0).view(1, 1, 8, 8)
    pool = SPPRoIPool(featmap_names=["p"], strides=[2], bins=[1, 2])
    # stride 2; torchvision's roi_pool (Fast R-CNN convention) rounds box / 2 to cells, inclusive
    boxes = [torch.tensor([[0.0, 0.0, 14.0, 14.0], [4.0, 4.0, 10.0, 10.0]])]
    out = pool({"p": feat}, boxes, [(16, 16)]).flatten(1)
    assert out.shape == (2, 5)
    # RoI 1 = cells 0..7 x 0..7 (the whole map): max 63, quadrant maxima 27, 31, 59, 63
    assert out[0].tolist() == [63.0, 27.0, 31.0, 59.0, 63.0]
    # RoI 2 = cells 2..5 x 2..5: max 45 (row 5, col 5); 2x2 bins of 2x2 cells each
    assert out[1].tolist() == [45.0, 27.0, 29.0, 43.0, 45.0]


def test_fpn_level_rule_and_multi_level_routing():
    boxes = torch.tensor([[0.0, 0.0, 224.0, 224.0], [0.0, 0.0, 56.0, 56.0], [0.0, 0.0, 900.0, 900.0]])
    assert fpn_level_of_boxes(boxes, 2, 5).tolist() == [4, 2, 5]
    feats = {"p2": torch.zeros(1, 2, 64, 64), "p3": torch.ones(1, 2, 32, 32)}
    pool = SPPRoIPool(featmap_names=["p2", "p3"], strides=[4, 8], bins=[1])
    boxes = [torch.tensor([[0.0, 0.0, 8.0, 8.0], [0.0, 0.0, 200.0, 200.0]])]
    out = pool(feats, boxes, [(256, 256)]).flatten(1)
    assert out[:, 0].tolist() == [0.0, 1.0]  # the small box pooled from p2, the large one from p3


def test_small_padded_image_uses_the_configured_strides():
    # a 40 px image padded to 64: p2 is 16 x 16 (stride 4), p3 8 x 8, p4 4 x 4, p5 2 x 2. The old
    # guess from the unpadded height (16 / 40 -> 2 ** round(log2 0.4) = 1/2) doubled every scale.
    cols = torch.arange(16.0).view(1, 1, 1, 16).expand(1, 1, 16, 16)
    feats = {"p2": cols, "p3": cols[..., ::2, ::2] + 100, "p4": cols[..., ::4, ::4] + 200,
             "p5": cols[..., ::8, ::8] + 300}
    pool = SPPRoIPool(featmap_names=["p2", "p3", "p4", "p5"], strides=[4, 8, 16, 32], bins=[1])
    box = [torch.tensor([[0.0, 0.0, 20.0, 20.0]])]  # sqrt(area) 20 -> FPN level 2 (p2)
    # pooled from p2: cells 0..5 (20 px / 4, inclusive rounding) -> max column value 5
    assert pool(feats, box, [(40, 40)]).flatten().tolist() == [5.0]


def test_strides_must_fit_the_levels():
    with pytest.raises(ValueError, match="2 strides for 1 feature maps"):
        SPPRoIPool(featmap_names=["p2"], strides=[4, 8])
    with pytest.raises(ValueError, match="consecutive powers of two"):
        SPPRoIPool(featmap_names=["p2", "p3"], strides=[4, 16])


def test_bad_bins():
    with pytest.raises(ValueError, match="bins"):
        SpatialPyramidPool(bins=[0, 2])


@pytest.mark.parametrize("config", ["faster_rcnn/faster_rcnn_r18_fpn_spp_shapes.yaml",
                                    "rfcn/rfcn_r18_shapes.yaml"])
def test_classic_two_stage_configs_build_train_and_predict(config):
    from pathlib import Path

    from detkit.config import load_config
    from detkit.models import build_model
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / config)
    torch.manual_seed(0)
    model = build_model(cfg["model"])
    if "spp" in config:
        assert isinstance(model.roi_head.pooler, SPPRoIPool)
        assert model.roi_head.box_head.fc6.in_features == 128 * (1 + 4 + 16)  # FPN channels x bins
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = model.train()([torch.rand(3, 128, 128), torch.rand(3, 96, 128)], targets)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"}
    assert all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        out = model.eval()([torch.rand(3, 128, 128)])
    assert out[0]["boxes"].shape[1] == 4 and (out[0]["boxes"] <= 128).all()
