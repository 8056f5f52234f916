"""Mask R-CNN export: the ONNX graph's ``mask_probs`` (28 x 28 probabilities per detection)
equal PyTorch's, and DeployedModel's pasted masks equal ``model(images)``'s, at two batch sizes /
image sizes of one dynamic-axes export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from detkit.config import load_config
from detkit.deploy.check import compare_detections, sample_images
from detkit.deploy.export import export_onnx, exportable
from detkit.deploy.runtime import DeployedModel
from detkit.models import build_model
from detkit.models.mask_paste import paste_masks

pytest.importorskip("onnxruntime")

SCALES = (("deltas", 0.1), ("bbox_pred", 0.1), ("cls_score", 0.5))   # box regressions stay small
PART_SCALES = {"rpn": 1.0}


def _confident_model() -> nn.Module:
    """The shapes config with prediction layers re-drawn larger (spread-out scores, masks that are
    not all 0.5) and BN statistics from two shapes images."""
    torch.manual_seed(0)
    model = build_model(load_config("configs/mask_rcnn/mask_rcnn_r18_fpn_shapes.yaml")["model"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for part in ("rpn", "roi_head", "mask_head"):
            for name, mod in getattr(model, part).named_modules():
                if isinstance(mod, (nn.Conv2d, nn.Linear)):
                    scale = next((s for key, s in SCALES if key in name), PART_SCALES.get(part, 2.0))
                    mod.weight.normal_(0, scale / mod.weight[0].numel() ** 0.5, generator=g)
                    mod.bias.zero_()
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.train()
                mod.momentum = 1.0
        exportable(model)(sample_images(2, 128, 128, seed=7))
    return model.eval()


@pytest.mark.slow
def test_exported_mask_probabilities_and_pasted_masks_equal_pytorch(tmp_path):
    model = _confident_model()
    path = tmp_path / "mask_rcnn.onnx"
    info = export_onnx(model, path, 128, 128, batch=2, dynamic=True)
    assert info["outputs"] == ["boxes", "scores", "labels", "num_detections", "mask_probs"]
    deployed = DeployedModel(path)
    for batch, (h, w) in ((2, (128, 128)), (1, (96, 160))):
        images = sample_images(batch, h, w, seed=batch)
        outputs = deployed.run(list(images))
        with torch.no_grad():
            reference = model(list(images))
            raw = model.forward_test(model.preprocess(list(images)))
        assert compare_detections(outputs, reference, max(h, w)) == []
        got = deployed(list(images))
        for i, (ref, res, probs) in enumerate(zip(reference, got, raw)):
            n = int(outputs["num_detections"][i])
            assert n > 5 and outputs["mask_probs"].shape[2:] == (28, 28)
            order = [int(np.argmin(np.abs(outputs["scores"][i, :n] - s))) for s in ref["scores"].tolist()]
            exported = torch.from_numpy(outputs["mask_probs"][i, order])
            assert (exported - probs["mask_probs"]).abs().max() < 1e-4
            # pasted: equal except where PyTorch's probability is 0.5 to float noise
            pasted = paste_masks(probs["mask_probs"], ref["boxes"], (h, w), threshold=None)
            decided = (pasted - 0.5).abs() > 1e-4
            assert res["masks"].shape == ref["masks"].shape == (n, h, w)
            assert torch.equal(res["masks"][order] & decided, ref["masks"] & decided)
            assert ref["masks"].any()
