"""YOLOv3 as a OneStageDetector: every configs/yolo file builds, a train/eval pass of the tiny
model, and the letterbox undo (pipeline scale/offset -> Detector.map_to_original)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from detkit.config import load_config
from detkit.data.base import to_sample
from detkit.data.transforms import Letterbox, Pipeline, build_pipeline
from detkit.models import build_model
from detkit.models.yolo_targets import assign_anchors, encode_boxes

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "yolo"


def outputs_encoding(head, boxes, labels, size):
    """Raw head outputs (batch 1) that decode to exactly ``boxes`` with class ``labels``."""
    outs = [torch.full((1, head.num_anchors, size // s, size // s, 5 + head.num_classes), -12.0)
            for s in head.strides]
    priors = head.priors(outs)
    flat = torch.cat([o.view(-1, o.shape[-1]) for o in outs])
    for box, label in zip(boxes, labels):
        i = assign_anchors(box[None], priors).pred_index
        off, lwh = encode_boxes(box[None], priors.cells[i], priors.strides[i], priors.anchor_wh[i])
        flat[i, :2] = torch.logit(off.clamp(1e-6, 1 - 1e-6))
        flat[i, 2:4], flat[i, 4], flat[i, 5 + label] = lwh, 12.0, 12.0
    return [f.view_as(o) for f, o in zip(flat.split([o[0, ..., 0].numel() for o in outs]), outs)]



@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(load_config(CONFIGS / "yolov3_tiny_shapes.yaml")["model"])


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_config_pipelines_and_heads_build(name):
    cfg = load_config(CONFIGS / name)
    for split in ("train", "val"):
        build_pipeline(cfg["data"][split]["pipeline"], f"data.{split}.pipeline")
    head = cfg["model"]["head"]
    assert head["type"] == "YOLOHead" and len(head["anchors"]) == 3
    if cfg["data"]["train"]["dataset"]["type"] == "Mosaic":
        letterbox = cfg["data"]["train"]["pipeline"][0]
        assert letterbox == {"type": "Letterbox", "size": cfg["data"]["train"]["dataset"]["size"]}


@pytest.mark.parametrize("name", ["yolov3_d53_coco.yaml", "yolov3_d53_spp_coco.yaml"])
def test_full_size_models_build_and_run(name):
    model = build_model(load_config(CONFIGS / name)["model"]).eval()
    n_params = sum(p.numel() for p in model.parameters())
    # Darknet-53 (40.6M) + neck + head: darknet's yolov3.cfg has 61.9M (62.0M with 80 classes)
    assert 60e6 < n_params < 64e6 + (4e6 if "spp" in name else 0)
    with torch.no_grad():
        out = model.head(model.features(model.preprocess([torch.rand(3, 64, 96)])))
    assert [tuple(o.shape) for o in out] == [(1, 3, 8, 12, 85), (1, 3, 4, 6, 85), (1, 3, 2, 3, 85)]


def test_tiny_model_train_and_eval(tiny_model):
    images = [torch.rand(3, 128, 128), torch.rand(3, 96, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 40.0, 44.0], [60.0, 60.0, 120.0, 118.0]]),
                "labels": torch.tensor([1, 3]), "iscrowd": torch.tensor([False, False])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    tiny_model.train()
    losses = tiny_model(images, targets)
    assert set(losses) == {"loss_xy", "loss_wh", "loss_obj", "loss_cls"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    tiny_model.eval()
    with torch.no_grad():
        results = tiny_model(images)
    assert len(results) == 2
    for r, (h, w) in zip(results, [(128, 128), (96, 128)]):
        assert r["boxes"].shape[1] == 4 and len(r["boxes"]) <= 100
        assert (r["boxes"][:, 2] <= w).all() and (r["boxes"][:, 3] <= h).all()
        assert r["labels"].max() < 4 if len(r["labels"]) else True


def test_letterbox_undo_through_the_contract(tiny_model):
    """Boxes encoded in letterboxed pixels come back in original pixels via scale / offset."""
    original = np.array([[3.0, 10.0, 30.0, 45.0], [50.0, 5.0, 79.0, 59.0]], np.float32)
    raw = {"image": np.zeros((60, 80, 3), np.uint8), "boxes": original, "labels": np.array([0, 2]),
           "iscrowd": np.zeros(2, bool), "image_id": 1, "orig_size": (60, 80)}
    image, target = to_sample(Pipeline([Letterbox(size=128)])(raw))
    assert tuple(image.shape) == (3, 128, 128)
    assert target["offset"][1] > 0                  # padded top and bottom
    head = tiny_model.head
    outs = outputs_encoding(head, target["boxes"], [0, 2], 128)
    result = head.predict(outs, [(128, 128)])[0]
    mapped = tiny_model.map_to_original(result, target)
    order = box_iou(torch.from_numpy(original), mapped["boxes"]).argmax(1)
    ious = box_iou(torch.from_numpy(original), mapped["boxes"][order]).diagonal()
    assert (ious > 0.99).all(), ious
    assert mapped["labels"][order].tolist() == [0, 2]
