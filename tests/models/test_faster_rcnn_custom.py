"""README "Faster R-CNN heads in your own model": torchvision backbone + FPN, detkit RPNHead and
RoIHead in a plain nn.Module (no config, registry or trainer). A few steps on a fixed batch must
lower the loss, and predictions must lie inside the images."""

import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from detkit.models.heads import RoIHead, RPNHead, TwoMLPHead
from detkit.structures import ShapeSpec

# ---- README example begins ----


class MyFasterRCNN(nn.Module):
    """torchvision ResNet-18 + FPN -> detkit RPNHead -> detkit RoIHead."""

    def __init__(self, num_classes: int, channels: int = 64):
        super().__init__()
        resnet = torchvision.models.resnet18(weights=None)
        self.body = IntermediateLayerGetter(resnet, {f"layer{i}": str(i - 1) for i in range(1, 5)})
        self.fpn = FeaturePyramidNetwork([64, 128, 256, 512], channels, extra_blocks=LastLevelMaxPool())
        shapes = {str(i): ShapeSpec(channels, 4 * 2 ** i) for i in range(4)}
        shapes["pool"] = ShapeSpec(channels, 64)                       # channels, stride
        self.rpn = RPNHead(input_shapes=shapes, anchor_sizes=[[16], [32], [64], [128], [256]],
                           post_nms_topk_train=300, post_nms_topk_test=100)
        self.roi_head = RoIHead(input_shapes=shapes, num_classes=num_classes,  # pools "0".."3"
                                box_head=TwoMLPHead(in_channels=channels, resolution=7, fc_dim=128),
                                batch_size_per_image=64)

    def forward(self, images, targets=None):
        """images: Float[B,3,H,W] normalised, H and W multiples of 32.
        targets: per image {"boxes": Float[N,4] xyxy pixels, "labels": Int64[N] in 0..C-1}."""
        sizes = [tuple(images.shape[-2:])] * len(images)
        features = self.fpn(self.body(images))
        rpn_out = self.rpn(features)
        proposals = [p["boxes"] for p in self.rpn.predict(rpn_out, sizes)]
        if self.training:
            losses = self.rpn.loss(rpn_out, targets, sizes)
            rois, samples = self.roi_head.sample_proposals(proposals, targets)
            losses.update(self.roi_head.loss(self.roi_head(features, rois, sizes), samples))
            return losses
        return self.roi_head.predict(self.roi_head(features, proposals, sizes), sizes)

# ---- README example ends ----


def test_custom_faster_rcnn_trains_and_predicts():
    torch.manual_seed(0)
    model = MyFasterRCNN(num_classes=3)
    images = torch.randn(2, 3, 128, 128)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 40.0, 120.0, 100.0]]),
                "labels": torch.tensor([0, 2])},
               {"boxes": torch.tensor([[30.0, 30.0, 90.0, 110.0]]), "labels": torch.tensor([1])}]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(8):
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.8 * history[0]
    model.eval()
    with torch.no_grad():
        results = model(images)
    assert len(results) == 2 and results[0]["boxes"].shape[0] > 0
    for r in results:
        assert (r["boxes"] >= 0).all() and (r["boxes"] <= 128).all()
        assert ((r["labels"] >= 0) & (r["labels"] < 3)).all()
