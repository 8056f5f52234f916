"""Predictor and tools/infer.py.

Most tests use ``BrightBoxDetector``, a stand-in detector whose "detection" is the bounding box
of the bright pixels it is given (in pipeline pixels). Images carry one bright rectangle at a
known place, so a correct result is known without any training: after the test pipeline
(resize / letterbox), EXIF rotation, grayscale / RGBA / 16-bit conversion and the mapping back,
the box must land on the rectangle's original pixels. The trained-model path is covered by
tests/test_end_to_end.py.
"""

import importlib.util
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch import nn

from detkit.config import dump_config
from detkit.inference import CheckpointError, Predictor, to_rgb_uint8
from detkit.models import DETECTORS
from detkit.models.detectors.base import Detector

ROOT = Path(__file__).resolve().parents[1]
H, W = 120, 160
RECT = (40, 30, 100, 70)          # x0, y0, x1, y1 (pixel edges) of the bright rectangle
NAMES = ["dark", "bright"]


class BrightBoxDetector(Detector):
    """Box of the pixels brighter than 0.8 in every channel (label 1, score ``score``), plus a
    fixed low-score box (label 0, score 0.1); ``sem_seg`` = 1 on bright pixels."""

    def __init__(self, *, num_classes: int = 2, with_seg: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.score = nn.Parameter(torch.tensor(0.9))
        self.with_seg = with_seg

    def forward_test(self, batch):
        pixels = batch.tensor * self.pixel_std + self.pixel_mean
        results = []
        for img, (h, w) in zip(pixels, batch.image_sizes):
            bright = (img[:, :h, :w] > 0.8).all(0)
            ys, xs = torch.nonzero(bright, as_tuple=True)
            box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            res = {"boxes": torch.stack([box, torch.tensor([0.0, 0.0, 4.0, 4.0])]),
                   "scores": torch.stack([self.score.detach(), torch.tensor(0.1)]),
                   "labels": torch.tensor([1, 0])}
            if self.with_seg:
                res["sem_seg"] = bright.long()
            results.append(res)
        return results


if "BrightBoxDetector" not in DETECTORS:
    DETECTORS.register()(BrightBoxDetector)


def make_image(h=H, w=W, rect=RECT, bright=250, dark=30):
    image = np.full((h, w, 3), dark, np.uint8)
    image[:, :, 1] = dark + 20            # not gray: a channel mix-up would show
    x0, y0, x1, y1 = rect
    image[y0:y1, x0:x1] = bright
    return image


def stub_cfg(pipeline=(), with_seg=False):
    return {"model": {"type": "BrightBoxDetector", "num_classes": 2, "with_seg": with_seg},
            "data": {"val": {"pipeline": list(pipeline)}}}


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "stub.pth"
    torch.save({"model": {"score": torch.tensor(0.9)}, "meta": {"class_names": NAMES}}, path)
    return path


def assert_box(result, rect=RECT, tol=1.5):
    bright = [b for b, lab in zip(result["boxes"].tolist(), result["labels"].tolist()) if lab == 1]
    assert len(bright) == 1, result
    np.testing.assert_allclose(bright[0], rect, atol=tol)


# ---------------------------------------------------------------------------------------------
# Predictor


@pytest.mark.parametrize("pipeline", [
    [],
    [{"type": "ResizeShortestEdge", "short_edge": 96, "max_size": 400}],      # scale 0.8
    [{"type": "ResizeShortestEdge", "short_edge": 240, "max_size": 400}],     # scale 2
    [{"type": "Letterbox", "size": [128, 128], "pad_value": 0}],              # scale + offset
])
def test_boxes_map_back_to_original_pixels(pipeline, ckpt):
    predictor = Predictor(stub_cfg(pipeline), ckpt, score_thr=0.3)
    result = predictor(make_image())
    assert result["image_size"] == (H, W)
    assert_box(result)
    assert result["label_names"] == ["bright"] and result["scores"].tolist() == pytest.approx([0.9])


def test_sem_seg_maps_back_through_letterbox(ckpt):
    cfg = stub_cfg([{"type": "Letterbox", "size": [128, 128], "pad_value": 0}], with_seg=True)
    result = Predictor(cfg, ckpt)(make_image())
    seg = result["sem_seg"]
    assert seg.shape == (H, W) and seg.dtype == torch.int64
    truth = torch.zeros(H, W, dtype=torch.bool)
    truth[RECT[1]:RECT[3], RECT[0]:RECT[2]] = True
    iou = (seg.bool() & truth).sum() / (seg.bool() | truth).sum()
    assert iou > 0.95


def test_score_threshold_and_batching(ckpt):
    images = [make_image(rect=(10 * i, 5, 10 * i + 30, 45)) for i in range(5)]
    keep_all = Predictor(stub_cfg(), ckpt, score_thr=0.0, batch_size=2)
    results = keep_all(images)
    assert isinstance(results, list) and len(results) == 5
    for i, r in enumerate(results):
        assert sorted(r["scores"].tolist()) == pytest.approx([0.1, 0.9])
        assert_box(r, (10 * i, 5, 10 * i + 30, 45))
    one_by_one = [keep_all(im) for im in images]
    for a, b in zip(results, one_by_one):
        assert torch.equal(a["boxes"], b["boxes"])
    assert len(Predictor(stub_cfg(), ckpt, score_thr=0.5)(images[0])["boxes"]) == 1


def test_paths_arrays_and_pil_agree(tmp_path, ckpt):
    image = make_image()
    path = tmp_path / "img.png"
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    predictor = Predictor(stub_cfg(), ckpt)
    results = predictor([str(path), path, image, Image.fromarray(image)])
    for r in results:
        assert_box(r, tol=0)
    with pytest.raises(TypeError, match="file path, a numpy"):
        predictor(42)


def write_exif_jpeg(path, displayed: np.ndarray, orientation: int) -> None:
    """Store ``displayed`` so that applying EXIF ``orientation`` shows it again."""
    inverse = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}
    stored = Image.fromarray(displayed).transpose(inverse[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, "JPEG", quality=95, exif=exif.tobytes())
    # Independent check of the fixture: Pillow's own EXIF handling shows the displayed image.
    with Image.open(path) as im:
        assert im.size != Image.fromarray(displayed).size or orientation == 3
        shown = np.asarray(ImageOps.exif_transpose(im))
    assert shown.shape == displayed.shape and np.abs(shown.astype(int) - displayed).mean() < 3


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_exif_rotated_jpeg_box_on_displayed_pixels(tmp_path, ckpt, orientation):
    path = tmp_path / f"exif{orientation}.jpg"
    write_exif_jpeg(path, make_image(), orientation)
    predictor = Predictor(stub_cfg([{"type": "ResizeShortestEdge", "short_edge": 96, "max_size": 400}]), ckpt)
    for result in predictor([path, Image.open(path)]):
        assert result["image_size"] == (H, W)
        assert_box(result, tol=2.5)


@pytest.mark.parametrize("kind", ["gray", "rgba", "uint16", "gray16", "float"])
def test_array_conversions(kind, ckpt):
    rgb = make_image()
    gray = rgb[..., 0]
    arrays = {"gray": gray, "rgba": np.dstack([rgb, np.full((H, W), 7, np.uint8)]),
              "uint16": rgb.astype(np.uint16) * 257, "gray16": gray.astype(np.uint16) * 257,
              "float": rgb.astype(np.float32) / 255}
    converted = to_rgb_uint8(arrays[kind])
    expected = np.repeat(gray[..., None], 3, 2) if kind.startswith("gray") else rgb
    assert converted.dtype == np.uint8 and np.array_equal(converted, expected)
    assert_box(Predictor(stub_cfg(), ckpt)(arrays[kind]), tol=0)
    if kind in ("gray", "gray16", "rgba"):          # the same image as a PIL image
        assert_box(Predictor(stub_cfg(), ckpt)(Image.fromarray(arrays[kind])), tol=0)


# ---------------------------------------------------------------------------------------------
# Checkpoints and class names

TINY = {"type": "OneStageDetector", "num_classes": 3,
        "backbone": {"type": "ResNet", "depth": 18, "out_features": ["c2", "c3", "c4", "c5"]},
        "neck": {"type": "FPN", "out_channels": 8},
        "head": {"type": "CenterNetHead", "in_feature": "p2", "head_channels": 8}}


def test_wrong_shapes_reported_with_key_and_shapes(tmp_path):
    from detkit.models import build_model

    torch.save({"model": build_model(TINY).state_dict()}, tmp_path / "c3.pth")
    with pytest.raises(CheckpointError) as err:
        Predictor({"model": dict(TINY, num_classes=4)}, tmp_path / "c3.pth")
    msg = str(err.value)
    assert "head.heatmap.2.weight" in msg and "[3, 8, 1, 1]" in msg and "[4, 8, 1, 1]" in msg


def test_foreign_and_broken_checkpoints_refused(tmp_path, ckpt):
    torch.save(nn.Linear(2, 2), tmp_path / "module.pth")           # a pickled object
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 3}, tmp_path / "other.pth")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "keys.pth")
    data = ckpt.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pth").write_text("not a checkpoint")
    expected = {"module.pth": "weights_only", "other.pth": "refused", "keys.pth": "refused",
                "cut.pth": "truncated or corrupt", "text.pth": "cannot read",
                "missing.pth": "not found"}
    for name, words in expected.items():
        with pytest.raises(CheckpointError, match=words) as err:
            Predictor(stub_cfg(), tmp_path / name)
        assert name in str(err.value)


def test_ema_prefix_and_embedded_config(tmp_path):
    cfg = stub_cfg()
    torch.save({"model": {"score": torch.tensor(0.5)}, "ema": {"score": torch.tensor(0.7)},
                "config": dump_config(cfg), "meta": {"class_names": NAMES}}, tmp_path / "ema.pth")
    predictor = Predictor(None, tmp_path / "ema.pth")     # config read from the checkpoint
    assert predictor.model.score.item() == pytest.approx(0.7)
    assert predictor.class_names == NAMES and predictor.class_names_source == "checkpoint meta"
    torch.save({"module.score": torch.tensor(0.6)}, tmp_path / "ddp.pth")   # bare DDP state dict
    with pytest.warns(UserWarning, match="no class names"):
        assert Predictor(cfg, tmp_path / "ddp.pth").model.score.item() == pytest.approx(0.6)


def test_class_names_fallbacks(tmp_path):
    from detkit.data.shapes import generate

    torch.save({"model": {"score": torch.tensor(0.9)}}, tmp_path / "bare.pth")
    cfg = stub_cfg()
    cfg["data"]["class_names"] = ["a", "b"]
    assert Predictor(cfg, tmp_path / "bare.pth").class_names == ["a", "b"]
    generate(tmp_path / "shapes", 1, 2, size=32)
    cfg = stub_cfg()
    cfg["data"].update(root=str(tmp_path / "shapes"))
    cfg["data"]["val"]["dataset"] = {"type": "CocoDetection", "img_dir": "val",
                                     "ann_file": "annotations/instances_val.json"}
    predictor = Predictor(cfg, tmp_path / "bare.pth")
    assert predictor.class_names == ["circle", "square", "triangle", "star"]
    assert predictor.label_to_cat_id == [1, 2, 3, 4]
    cfg["data"]["root"] = str(tmp_path / "gone")            # dataset absent at inference time
    with pytest.warns(UserWarning, match="no class names"):
        assert Predictor(cfg, tmp_path / "bare.pth").class_names == ["class_0", "class_1"]


def test_bad_device_and_amp(ckpt):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Predictor(stub_cfg(), ckpt, device="cuda")
    assert_box(Predictor(stub_cfg(), ckpt, amp=True)(make_image()))


def test_amp_real_model_close_to_fp32():
    torch.manual_seed(0)
    cfg = {"model": TINY}
    with pytest.warns(UserWarning, match="random weights"):
        fp32 = Predictor(cfg, None, score_thr=0.0, class_names=["a", "b", "c"])
        bf16 = Predictor(cfg, None, score_thr=0.0, amp=True, class_names=["a", "b", "c"])
    bf16.model.load_state_dict(fp32.model.state_dict())
    image = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    a, b = fp32(image), bf16(image)
    assert a["scores"].dtype == b["scores"].dtype == torch.float32
    assert (a["boxes"] <= torch.tensor([96, 64, 96, 64])).all()
    assert abs(a["scores"].max().item() - b["scores"].max().item()) < 0.02


# ---------------------------------------------------------------------------------------------
# tools/infer.py


def _load_infer():
    spec = importlib.util.spec_from_file_location("tool_infer", ROOT / "tools" / "infer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


infer = _load_infer()


def write_inputs(folder: Path) -> dict[str, tuple]:
    """Good images of every kind (name -> rect) under ``folder`` (one in a subfolder)."""
    (folder / "sub").mkdir(parents=True)
    rects = {}

    def put(name, array, rect):
        cv2.imwrite(str(folder / name), array)
        rects[name] = rect

    rgb = make_image()
    put("plain.png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), RECT)
    r2 = (10, 20, 50, 90)
    put("sub/gray.png", make_image(rect=r2)[..., 0], r2)
    r3 = (90, 10, 150, 40)
    bgra = cv2.cvtColor(make_image(rect=r3), cv2.COLOR_RGB2BGRA)
    bgra[..., 3] = 60
    put("rgba.png", bgra, r3)
    r4 = (5, 60, 70, 115)
    put("deep16.png", cv2.cvtColor(make_image(rect=r4), cv2.COLOR_RGB2BGR).astype(np.uint16) * 257, r4)
    write_exif_jpeg(folder / "rotated.jpg", make_image(), 6)
    rects["rotated.jpg"] = RECT
    return rects


def test_infer_tool_folder_with_bad_files(tmp_path, ckpt, capsys):
    folder = tmp_path / "in"
    rects = write_inputs(folder)
    (folder / "notes.jpg").write_text("this is not an image")
    good = (folder / "rotated.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(good[: len(good) // 2])
    (folder / "empty.png").write_bytes(b"")
    cfg_path = tmp_path / "stub.yaml"
    dump_config(stub_cfg([{"type": "ResizeShortestEdge", "short_edge": 96, "max_size": 400}]), cfg_path)
    out = tmp_path / "out"
    code = infer.main([str(cfg_path), str(ckpt), str(folder), "--out", str(out), "--batch-size", "2"])
    captured = capsys.readouterr()
    assert code == 1
    for bad in ("notes.jpg", "cut.jpg", "empty.png"):
        assert bad in captured.err
    assert "5 images, 5 detections" in captured.out and "3 failed" in captured.out
    records = json.loads((out / "predictions.json").read_text())
    by_file = {r["file_name"]: r for r in records}
    assert set(by_file) == set(rects)
    for name, (x0, y0, x1, y1) in rects.items():
        rec = by_file[name]
        assert rec["category_name"] == "bright" and rec["category_id"] == 1
        np.testing.assert_allclose(rec["bbox"], [x0, y0, x1 - x0, y1 - y0], atol=2.5)
        annotated = cv2.imread(str(out / name), cv2.IMREAD_UNCHANGED)
        assert annotated.shape == (H, W, 3)             # displayed size, also for the EXIF file
    # The annotated EXIF image (a JPEG again) has the box outline on the displayed pixels:
    # the column of the box's left edge changed, a column 10 px further left did not.
    from detkit.data.io import read_image
    shown, annotated = read_image(folder / "rotated.jpg").astype(int), read_image(out / "rotated.jpg")
    rows = slice(RECT[1] + 12, RECT[3] - 2)          # below the caption
    change = np.abs(annotated.astype(int) - shown)[rows].mean(axis=(0, 2))
    assert change[RECT[0]] > 25 and change[RECT[0] - 10] < 5 and change[RECT[0] + 10] < 5


def test_infer_tool_glob_coco_ids_and_all_good_exit_zero(tmp_path, ckpt, capsys):
    folder = tmp_path / "in"
    write_inputs(folder)
    gt = {"images": [{"id": 7, "file_name": "plain.png", "height": H, "width": W},
                     {"id": 9, "file_name": "rgba.png", "height": H, "width": W}],
          "annotations": [], "categories": [{"id": 11, "name": "dark"}, {"id": 12, "name": "bright"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    cfg_path = tmp_path / "stub.yaml"
    dump_config(stub_cfg(), cfg_path)
    out = tmp_path / "out"
    code = infer.main([str(cfg_path), str(ckpt), str(folder / "*.png"), "--out", str(out),
                       "--coco-gt", str(tmp_path / "gt.json"), "--score-thr", "0", "--no-draw"])
    assert code == 0
    records = json.loads((out / "predictions.json").read_text())
    assert {(r["file_name"], r["image_id"], r["category_id"]) for r in records} == {
        ("plain.png", 7, 12), ("plain.png", 7, 11), ("rgba.png", 9, 12), ("rgba.png", 9, 11),
        ("deep16.png", 10, 12), ("deep16.png", 10, 11)}       # not in the gt: a fresh id
    assert not list(out.glob("*.png"))                       # --no-draw
    assert "6 detections" in capsys.readouterr().out


def test_infer_tool_missing_input_and_bad_checkpoint(tmp_path, ckpt, capsys):
    cfg_path = tmp_path / "stub.yaml"
    dump_config(stub_cfg(), cfg_path)
    out = str(tmp_path / "o")
    assert infer.main([str(cfg_path), str(ckpt), str(tmp_path / "nope.png"), "--out", out]) == 1
    assert "nope.png" in capsys.readouterr().err
    torch.save(nn.Linear(1, 1), tmp_path / "bad.pth")
    assert infer.main([str(cfg_path), str(tmp_path / "bad.pth"), str(tmp_path), "--out", out]) == 2
    assert "bad.pth" in capsys.readouterr().err


def test_infer_tool_video(tmp_path, ckpt):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (W, H))
    if not writer.isOpened():
        pytest.skip("OpenCV cannot write MJPG video here")
    rects = [(20 + 10 * i, 30, 80 + 10 * i, 70) for i in range(4)]
    for r in rects:
        writer.write(cv2.cvtColor(make_image(rect=r), cv2.COLOR_RGB2BGR))
    writer.release()
    cfg_path = tmp_path / "stub.yaml"
    dump_config(stub_cfg(), cfg_path)
    out = tmp_path / "out"
    assert infer.main([str(cfg_path), str(ckpt), str(path), "--out", str(out), "--batch-size", "3"]) == 0
    records = json.loads((out / "predictions.json").read_text())
    assert [r["frame"] for r in records] == [0, 1, 2, 3]
    for rec, (x0, y0, x1, y1) in zip(records, rects):
        np.testing.assert_allclose(rec["bbox"], [x0, y0, x1 - x0, y1 - y0], atol=2.5)
    cap = cv2.VideoCapture(str(out / "clip.mp4"))
    frames = 0
    while cap.read()[0]:
        frames += 1
    cap.release()
    assert frames == 4


def test_torchvision_faster_rcnn_state_dict_is_converted(tmp_path):
    """A torchvision Faster R-CNN state dict is recognised and converted (detkit.models.convert)."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    from detkit.config import load_config

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                                   norm_layer=nn.BatchNorm2d)
    backbone.fpn.layer_blocks[0][0].weight.data.fill_(0.25)        # a value we can look for
    tv = FasterRCNN(backbone, num_classes=5)
    backbone.fpn.inner_blocks[0][0].weight.data.fill_(0.5)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    cfg = load_config(ROOT / "configs" / "faster_rcnn" / "faster_rcnn_r18_fpn_shapes.yaml")
    cfg["model"]["neck"]["out_channels"] = 256                    # torchvision's widths
    cfg["model"]["roi_head"]["box_head"]["fc_dim"] = 1024
    try:
        predictor = Predictor(cfg, tmp_path / "tv.pth", class_names=["a", "b", "c", "d"])
    except CheckpointError as e:
        pytest.fail(f"torchvision state dict not converted: {e}")
    assert (predictor.model.neck.output_convs[0].weight == 0.25).all()
    assert (predictor.model.neck.lateral_convs[0].weight == 0.5).all()
    assert len(predictor(make_image())["boxes"]) >= 0


def test_infer_tool_segmentation_masks(tmp_path):
    image = make_image()
    cv2.imwrite(str(tmp_path / "seg.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    torch.save({"model": {"score": torch.tensor(0.9)}, "meta": {"class_names": ["background", "bright"]}},
               tmp_path / "seg.pth")
    dump_config(stub_cfg([{"type": "Letterbox", "size": [96, 96]}], with_seg=True), tmp_path / "seg.yaml")
    out = tmp_path / "out"
    assert infer.main([str(tmp_path / "seg.yaml"), str(tmp_path / "seg.pth"), str(tmp_path / "seg.png"),
                       "--out", str(out), "--score-thr", "0.5"]) == 0
    mask = cv2.imread(str(out / "masks" / "seg.png"), cv2.IMREAD_UNCHANGED)
    truth = np.zeros((H, W), np.uint8)
    truth[RECT[1]:RECT[3], RECT[0]:RECT[2]] = 1
    assert mask.shape == (H, W) and (mask != truth).mean() < 0.02
    annotated = cv2.cvtColor(cv2.imread(str(out / "seg.png")), cv2.COLOR_BGR2RGB)
    # Background not painted (below the class legend, which sits in the top-left corner).
    assert (annotated[90:115, 5:30] == image[90:115, 5:30]).all()
    assert np.abs(annotated[50:65, 50:90].astype(int) - image[50:65, 50:90]).mean() > 20   # object blended
