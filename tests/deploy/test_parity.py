"""Every shipped detector family exports end to end; onnxruntime detections equal PyTorch's.

Each family: a small model (shapes configs, or COCO configs shrunk to ResNet-18 / thin Darknet)
with confident random weights, exported with ``--dynamic`` at batch 2 x 128 x 128 and run at
two batch sizes and two image sizes, and exported with fixed axes; the detections of
onnxruntime (and of OpenVINO for two families) must equal ``model(images)``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detkit.deploy.check import compare_detections, sample_images
from detkit.deploy.export import export_onnx
from detkit.deploy.onnx_runtime import OnnxRuntimeModel

pytest.importorskip("onnxruntime")

R18_COCO = ("model.backbone.weights=null", "model.backbone.depth=18", "model.num_classes=4")
FAMILIES = {
    "yolov3_tiny": ("configs/yolo/yolov3_tiny_shapes.yaml", ()),
    "yolov1": ("configs/yolov1/yolov1_d53tiny_shapes.yaml", ()),
    "centernet": ("configs/centernet/centernet_r18_shapes.yaml", ()),
    "centernet_flip": ("configs/centernet/centernet_r18_shapes.yaml", ("model.flip_test=true",)),
    "faster_rcnn_fpn": ("configs/faster_rcnn/faster_rcnn_r18_fpn_shapes.yaml", ()),
    "rfcn_align": ("configs/rfcn/rfcn_r18_shapes.yaml", ()),
    "seg_fpn": ("configs/segmentation/seg_r18_shapes.yaml", ()),
}
SLOW_FAMILIES = {
    "faster_rcnn_spp": ("configs/faster_rcnn/faster_rcnn_r18_fpn_spp_shapes.yaml", ()),
    "yolov3_spp": ("configs/yolo/yolov3_d53_spp_coco.yaml",
                   ("model.backbone.width_mult=0.125", "model.backbone.depth_mult=0.33",
                    "model.head.feat_channels=[32,64,128]", "model.num_classes=4")),
    "faster_rcnn_c4": ("configs/faster_rcnn/faster_rcnn_r50_c4_coco.yaml",
                       R18_COCO + ("model.roi_head.box_head.depth=18",
                                   "model.roi_head.box_head.weights=null",
                                   "model.rpn.pre_nms_topk_test=300", "model.rpn.post_nms_topk_test=100")),
    "faster_rcnn_dc5": ("configs/faster_rcnn/faster_rcnn_r50_dc5_coco.yaml",
                        R18_COCO + ("model.roi_head.box_head.fc_dim=64",)),
    # PS-RoI *pooling* reads whole cells, so RoIs covering the same cells of the 8 x 8 map get
    # exactly equal scores; with 300 proposals some tie, and which of two tied boxes NMS keeps is
    # not defined (torch and onnxruntime sort ties differently): 50 proposals avoid ties here
    "rfcn_pool": ("configs/rfcn/rfcn_r50_coco.yaml",
                  R18_COCO + ("model.roi_head.reduced_channels=64", "model.roi_head.group_size=3",
                              "model.rpn.post_nms_topk_test=50")),
    "deeplabv3": ("configs/segmentation/deeplabv3_r50_d8_voc.yaml",
                  ("model.backbone.weights=null", "model.backbone.depth=18",
                   "model.head.channels=32", "model.head.norm=BN")),
}


def _reference(model, images):
    with torch.no_grad():
        return model(list(images))


def _assert_parity(outputs: dict, reference: list[dict], size: int) -> None:
    assert compare_detections(outputs, reference, size) == []
    if "num_detections" in outputs:
        assert outputs["num_detections"].sum() > 0, "the test needs detections to compare"
        rows = outputs["labels"].shape[1]
        padding = np.arange(rows)[None] >= outputs["num_detections"][:, None]
        assert (outputs["labels"][padding] == -1).all() and (outputs["scores"][padding] == 0).all()


def _check_family(config, overrides, confident_model, tmp_path):
    model = confident_model(config, overrides)
    dynamic = tmp_path / "dynamic.onnx"
    export_onnx(model, dynamic, 128, 128, batch=2, dynamic=True)
    session = OnnxRuntimeModel(dynamic)
    for batch, (h, w) in ((2, (128, 128)), (1, (96, 160))):
        images = sample_images(batch, h, w, seed=batch)
        _assert_parity(session(images.numpy()), _reference(model, images), max(h, w))
    fixed = tmp_path / "fixed.onnx"
    export_onnx(model, fixed, 128, 128, batch=2)
    images = sample_images(2, 128, 128, seed=3)
    _assert_parity(OnnxRuntimeModel(fixed)(images.numpy()), _reference(model, images), 128)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_exports_with_parity(family, confident_model, tmp_path):
    _check_family(*FAMILIES[family], confident_model, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(SLOW_FAMILIES))
def test_coco_family_exports_with_parity(family, confident_model, tmp_path):
    _check_family(*SLOW_FAMILIES[family], confident_model, tmp_path)


@pytest.mark.parametrize("family", ["centernet", "faster_rcnn_fpn"])
def test_openvino_runs_the_same_file(family, confident_model, tmp_path):
    from detkit.deploy.openvino_runtime import OpenVINOModel

    pytest.importorskip("openvino")
    model = confident_model(*FAMILIES[family])
    path = tmp_path / "m.onnx"
    export_onnx(model, path, 128, 128, batch=2, dynamic=True)
    images = sample_images(2, 96, 128, seed=4)
    _assert_parity(OpenVINOModel(path)(images.numpy()), _reference(model, images), 128)
