"""BatchNorm folding: same detections, no norm left after a conv, refuses training mode."""

import copy

import pytest
import torch
from torch import nn

from detkit.deploy.check import compare_detections, sample_images
from detkit.deploy.optimize import fold_batchnorm
from detkit.models.layers.frozen_bn import FrozenBatchNorm2d


@pytest.mark.parametrize("config", ["configs/yolo/yolov3_tiny_shapes.yaml",
                                    "configs/faster_rcnn/faster_rcnn_r18_fpn_shapes.yaml"])
def test_folded_model_gives_the_same_detections(config, confident_model):
    model = confident_model(config)
    folded = copy.deepcopy(model)
    assert fold_batchnorm(folded) > 15
    norms = [m for m in folded.backbone.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert norms == []
    images = sample_images(2, 128, 128, seed=5)
    with torch.no_grad():
        expected, got = model(list(images)), folded(list(images))
    as_arrays = {"boxes": torch.stack([torch.nn.functional.pad(g["boxes"], (0, 0, 0, 100 - len(g["boxes"])))
                                       for g in got]).numpy(),
                 "scores": torch.stack([torch.nn.functional.pad(g["scores"], (0, 100 - len(g["scores"])))
                                        for g in got]).numpy(),
                 "labels": torch.stack([torch.nn.functional.pad(g["labels"], (0, 100 - len(g["labels"])))
                                        for g in got]).numpy(),
                 "num_detections": torch.tensor([len(g["boxes"]) for g in got]).numpy()}
    assert compare_detections(as_arrays, expected, 128) == []


def test_fold_refuses_training_mode():
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train())


def test_fold_matches_conv_then_frozen_bn():
    norm = FrozenBatchNorm2d(4)
    norm.weight.uniform_(0.5, 2)
    norm.bias.normal_()
    norm.running_mean.normal_()
    norm.running_var.uniform_(0.5, 2)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), norm).eval()
    x = torch.randn(2, 3, 9, 9)
    expected = net(x)
    assert fold_batchnorm(net) == 1 and isinstance(net[1], nn.Identity)
    torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=1e-5)
