"""Every shipped detector family exports end to end; the exported file equals PyTorch.

Each family: a small model (shapes configs, or COCO configs shrunk to ResNet-18 / thin Darknet)
with confident random weights, exported once with ``--dynamic`` (batch 2 x 128 x 128) and once
with fixed axes. Compared with ``model(images)``:

* the raw graph on a batch that needs no padding (``image_sizes`` not fed: its default);
* ``DeployedModel`` (what ``Predictor`` runs) on images that need padding: one 100 x 150 image
  and a portrait + landscape batch as ``tools/infer.py`` forms from a folder (each image padded
  to 160 x 160, its own size fed as ``image_sizes``), and on the fixed export with
  images padded to 128 x 128 (112 x 119 for a stride-32 model). Same labels, scores within
  1e-4, boxes within 0.5 px.

Before the graph clipped and size-filtered at each image's unpadded size, 16/100 (CenterNet) and
6/100 (Faster R-CNN) detections of the 100 x 150 image and 70/200, 52/200 of the mixed batch
differed; the border assertion makes sure boxes that need that clipping are in the test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detkit.deploy.check import compare_detections, compare_results, sample_images
from detkit.deploy.export import export_onnx
from detkit.deploy.onnx_runtime import OnnxRuntimeModel
from detkit.deploy.runtime import DeployedModel

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


def _touches_border(reference: list[dict], images: list[torch.Tensor]) -> bool:
    """Some box of some image ends on that image's (unpadded) right or bottom edge."""
    return any(bool(((r["boxes"][:, 2] == im.shape[-1]) | (r["boxes"][:, 3] == im.shape[-2])).any())
               for r, im in zip(reference, images))


def _padded_images() -> list[list[torch.Tensor]]:
    """A 100 x 150 image alone, and a portrait + landscape batch (padded to 160 x 160)."""
    return [[sample_images(1, 100, 150, seed=3)[0]],
            [sample_images(1, 150, 100, seed=4)[0], sample_images(1, 100, 150, seed=5)[0]]]


def _assert_deployed_parity(deployed: DeployedModel, model, images: list[torch.Tensor],
                            detector: bool) -> list[dict]:
    reference = _reference(model, images)
    assert compare_results(deployed(images), reference) == []
    if detector:
        assert sum(len(r["boxes"]) for r in reference) > 0, "the test needs detections to compare"
    return reference


def _check_family(config, overrides, confident_model, tmp_path):
    model = confident_model(config, overrides)
    dynamic = tmp_path / "dynamic.onnx"
    info = export_onnx(model, dynamic, 128, 128, batch=2, dynamic=True)
    detector = "num_detections" in info["outputs"]
    images = sample_images(2, 128, 128, seed=2)
    _assert_parity(OnnxRuntimeModel(dynamic)(images.numpy()), _reference(model, images), 128)
    deployed = DeployedModel(dynamic)
    border = False
    for batch in _padded_images():
        reference = _assert_deployed_parity(deployed, model, batch, detector)
        border = border or _touches_border(reference, batch)
    assert border or not detector, "no box is clipped at an unpadded border: the test is too weak"
    fixed = tmp_path / "fixed.onnx"
    export_onnx(model, fixed, 128, 128, batch=2)
    div = model.size_divisibility                # images that pad to the fixed 128 x 128
    smaller = list(sample_images(2, 128 - div // 2, 128 - div // 4 - 1, seed=6))
    _assert_deployed_parity(DeployedModel(fixed), model, smaller, detector)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_exports_with_parity(family, confident_model, tmp_path):
    _check_family(*FAMILIES[family], confident_model, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(SLOW_FAMILIES))
def test_coco_family_exports_with_parity(family, confident_model, tmp_path):
    _check_family(*SLOW_FAMILIES[family], confident_model, tmp_path)


@pytest.mark.parametrize("family", ["centernet", "faster_rcnn_fpn"])
def test_openvino_runs_the_same_file(family, confident_model, tmp_path):
    pytest.importorskip("openvino")
    model = confident_model(*FAMILIES[family])
    path = tmp_path / "m.onnx"
    export_onnx(model, path, 128, 128, batch=2, dynamic=True)
    deployed = DeployedModel(path, backend="openvino")
    assert deployed.runtime.input_names == ["images", "image_sizes"]
    images = sample_images(2, 96, 128, seed=4)
    _assert_parity(deployed.runtime(images.numpy()), _reference(model, images), 128)
    for batch in _padded_images():
        _assert_deployed_parity(deployed, model, batch, True)


def test_image_sizes_default_is_the_padded_input(confident_model, tmp_path):
    """Not feeding ``image_sizes`` equals feeding the padded size; feeding the unpadded size of
    a padded image gives PyTorch's detections of the unpadded image."""
    model = confident_model(*FAMILIES["centernet"])
    path = tmp_path / "m.onnx"
    export_onnx(model, path, 128, 128, dynamic=True)
    session = OnnxRuntimeModel(path)
    image = sample_images(1, 100, 150, seed=3)
    padded = torch.nn.functional.pad(image - model.pixel_mean, (0, 10, 0, 28)) + model.pixel_mean
    default = session(padded.numpy())
    full = session(padded.numpy(), np.array([[128, 160]]))
    for key in default:
        np.testing.assert_array_equal(default[key], full[key])
    _assert_parity(default, _reference(model, padded), 160)
    unpadded = session(padded.numpy(), np.array([[100, 150]]))
    _assert_parity(unpadded, _reference(model, image), 160)
    assert compare_detections(default, _reference(model, image), 160) != []


def test_centernet_topk_larger_than_the_map_of_a_small_input(confident_model, tmp_path):
    """``topk`` is min(k, C*H*W) in the graph: a dynamic export at 128 runs at 32 x 32, where
    4 classes x 8 x 8 cells < 300 (the trace-time minimum made TopK fail there)."""
    model = confident_model(FAMILIES["centernet"][0], ("model.head.topk=300",))
    path = tmp_path / "m.onnx"
    export_onnx(model, path, 128, 128, dynamic=True)
    images = sample_images(1, 32, 32, seed=8)
    _assert_parity(OnnxRuntimeModel(path)(images.numpy()), _reference(model, images), 32)


def test_centernet_decode_equals_decode_heatmap():
    from detkit.deploy.postprocess import centernet_decode
    from detkit.models.centernet_targets import decode_heatmap

    g = torch.Generator().manual_seed(0)
    heat = torch.rand(2, 3, 9, 11, generator=g)
    wh, offset = torch.rand(2, 2, 9, 11, generator=g) * 5, torch.rand(2, 2, 9, 11, generator=g)
    sizes = torch.tensor([[30, 44], [36, 17]])                 # cells ceil(/4): 8 x 11, 9 x 5
    got = centernet_decode(heat, wh, offset, 4, 50, sizes)
    ref = decode_heatmap(heat.clone(), wh, offset, 4, 50, valid_sizes=[(8, 11), (9, 5)])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    assert (got[1] < 3).all() and got[0].shape == (2, 50)


def _with_confident_masks(model, threshold: float):
    """The mask branch re-drawn with larger weights (probabilities spread over (0, 1), not all
    0.5 as the N(0, 0.001) logits init gives) and a non-default ``mask_threshold``."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for mod in model.mask_head.modules():
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                mod.weight.normal_(0, 1.5 / mod.weight[0].numel() ** 0.5, generator=g)
    model.mask_head.mask_threshold = threshold
    return model


def test_mask_rcnn_masks_equal_pytorch_on_padded_and_mixed_batches(confident_model, tmp_path):
    """Mask R-CNN: boxes as above, and the pasted masks at the model's ``mask_threshold`` (0.7
    here; DeployedModel pasted at 0.5 before) equal PyTorch's except at pixels whose probability
    is the threshold to float noise."""
    from detkit.models.mask_paste import paste_masks

    model = _with_confident_masks(confident_model("configs/mask_rcnn/mask_rcnn_r18_fpn_shapes.yaml"), 0.7)
    path = tmp_path / "mask.onnx"
    info = export_onnx(model, path, 128, 128, batch=2, dynamic=True)
    assert info["mask_threshold"] == 0.7
    deployed = DeployedModel(path)
    for images in _padded_images():
        with torch.no_grad():
            reference = model(images)
            raw = model.forward_test(model.preprocess(images))
        got = deployed(images)
        assert compare_results(got, reference) == []
        for image, res, ref, probs in zip(images, got, reference, raw):
            order = [int(np.argmin(np.abs(res["scores"].numpy() - s))) for s in ref["scores"].tolist()]
            size = tuple(image.shape[-2:])
            pasted = paste_masks(probs["mask_probs"], ref["boxes"], size, threshold=None)
            decided = (pasted - 0.7).abs() > 1e-4
            assert res["masks"].shape == ref["masks"].shape == (len(order),) + size
            assert torch.equal(res["masks"][order] & decided, ref["masks"] & decided)
            assert ref["masks"].any() and ((pasted > 0.5) & (pasted < 0.7)).any()


def test_segmentor_label_map_is_resized_as_logits_like_pytorch(confident_model, tmp_path):
    """A pipeline that resized the image (metas with ``scale``): the label map in original pixels
    is the argmax of bilinearly resized logits on both paths (DeployedModel resized the label
    map by nearest neighbour before, which differs along every class border)."""
    from detkit.evaluation.segmentation import sem_seg_to_original

    model = confident_model(*FAMILIES["seg_fpn"])
    path = tmp_path / "seg.onnx"
    info = export_onnx(model, path, 128, 128, dynamic=True)
    assert info["outputs"] == ["sem_seg", "sem_seg_logits"]
    images = [sample_images(1, 100, 150, seed=3)[0], sample_images(1, 96, 128, seed=4)[0]]
    metas = [{"orig_size": (130, 190), "scale": (150 / 190, 100 / 130)},
             {"orig_size": (61, 83), "scale": (128 / 83, 96 / 61)}]
    with torch.no_grad():
        reference = model(images, metas)
    deployed = DeployedModel(path)
    got = deployed(images, metas)
    assert compare_results(got, reference) == []
    nearest = [sem_seg_to_original(r["sem_seg"], m) for r, m in zip(deployed(images), metas)]
    assert any(not torch.equal(a, r["sem_seg"]) for a, r in zip(nearest, reference))
