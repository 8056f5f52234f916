"""README "Use a detkit head in your own model": the same code, run as a test.

A torchvision ResNet-18 (random weights) feeds detkit's ``FPN`` and ``CenterNetHead`` inside a
plain user-defined ``nn.Module``; no config, registry or detkit trainer is involved. Training a
few steps on a fixed batch of the built-in shapes must lower the loss, and the head's ``predict``
must return boxes inside the image.
"""

import re
from pathlib import Path

import pytest

# ---- README example begins ----
import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

from detkit.data.shapes import render_image
from detkit.models.heads import CenterNetHead
from detkit.models.necks import FPN
from detkit.structures import ShapeSpec


class MyDetector(nn.Module):
    """ResNet-18 (torchvision) -> detkit FPN -> detkit CenterNetHead on the stride-4 level."""

    def __init__(self, num_classes: int):
        super().__init__()
        resnet = torchvision.models.resnet18(weights=None)   # or weights="DEFAULT"
        self.body = IntermediateLayerGetter(
            resnet, {"layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"})
        shapes = {"c2": ShapeSpec(64, 4), "c3": ShapeSpec(128, 8),
                  "c4": ShapeSpec(256, 16), "c5": ShapeSpec(512, 32)}   # channels, stride
        self.fpn = FPN(input_shapes=shapes, out_channels=64)
        self.head = CenterNetHead(input_shapes=self.fpn.output_shape(), num_classes=num_classes,
                                  in_feature="p2")
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, images, targets=None):
        """images: Float[B,3,H,W] RGB in [0,1], H and W multiples of 32.
        targets: per image {"boxes": Float[N,4] xyxy pixels, "labels": Int64[N]}."""
        outputs = self.head(self.fpn(self.body((images - self.mean) / self.std)))
        sizes = [tuple(images.shape[-2:])] * len(images)
        if self.training:
            return self.head.loss(outputs, targets, sizes)     # {"loss_heatmap": ..., ...}
        return self.head.predict(outputs, sizes)               # [{"boxes", "scores", "labels"}]


def make_batch(num_images=4, size=64):
    """Images and targets from detkit's shapes generator (any data in this format works)."""
    images, targets = [], []
    for i in range(num_images):
        image, _, instances = render_image(seed=0, split="train", index=i, size=size)
        images.append(torch.from_numpy(image).permute(2, 0, 1).float() / 255)
        boxes = torch.tensor([a["bbox"] for a in instances], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]                               # xywh -> xyxy
        labels = torch.tensor([a["category_id"] - 1 for a in instances], dtype=torch.int64)
        targets.append({"boxes": boxes, "labels": labels})
    return torch.stack(images), targets


def train(steps=30):
    torch.manual_seed(0)
    model = MyDetector(num_classes=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, targets = make_batch()
    history = []
    model.train()
    for _ in range(steps):
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    model.eval()
    with torch.no_grad():
        detections = model(images)
    return history, detections


if __name__ == "__main__":
    history, detections = train()
    confident = detections[0]["scores"] > 0.3
    print(f"loss {history[0]:.2f} -> {history[-1]:.2f}; first image: "
          f"{detections[0]['boxes'][confident].round().tolist()}")
# ---- README example ends ----


def test_custom_detector_loss_drops_and_predicts():
    history, detections = train(steps=30)
    assert all(torch.isfinite(torch.tensor(history)))
    first, last = history[0], sum(history[-5:]) / 5
    assert last < 0.5 * first, f"loss did not drop enough: {history[0]:.3f} -> {last:.3f}"
    assert len(detections) == 4
    for det in detections:
        assert det["boxes"].shape[1] == 4 and len(det["boxes"]) == len(det["scores"])
        assert (det["boxes"] >= 0).all() and (det["boxes"] <= 64).all()
        assert det["labels"].min() >= 0 and det["labels"].max() < 4


def test_readme_example_is_this_code():
    """The README section shows exactly the code above (skipped until the section exists)."""
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    section = re.search(r"#+ Use a detkit head in your own model\n(.*?)(?=\n#+ |\Z)", text, re.S)
    if section is None:
        pytest.skip("README.md has no 'Use a detkit head in your own model' section yet")
    block = re.search(r"```python\n(.*?)```", section.group(1), re.S)
    assert block is not None, "the README section has no python code block"
    source = Path(__file__).read_text(encoding="utf-8")
    example = source.split("# ---- README example begins ----\n")[1]
    example = example.split("# ---- README example ends ----")[0]
    assert block.group(1).strip() == example.strip()
