"""tools/infer.py: a camera index as input (issue 29, finding 7) and the class-wise NMS it applies to
CenterNet's drawings by default (finding 10).

The camera is a stand-in for ``cv2.VideoCapture`` (monkeypatched): it hands out frames with a
bright rectangle that the stub detector of tests/test_inference.py boxes exactly. The NMS
reference is torchvision's ``batched_nms`` over the model's own NMS-free output."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms, box_iou

from detkit.config import dump_config
from detkit.models import build_model


def _inference_tests():
    """tests/test_inference.py: its stub detector, configs and loaded tools/infer.py."""
    name = "detkit_test_inference_shared"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("test_inference.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_shared = _inference_tests()
TINY, infer, make_image, stub_cfg = _shared.TINY, _shared.infer, _shared.make_image, _shared.stub_cfg

RECTS = [(20 + 10 * i, 30, 80 + 10 * i, 70) for i in range(3)]


class FakeCamera:
    """``cv2.VideoCapture(index)``: ``frames`` BGR frames, then a failed read (camera unplugged),
    or KeyboardInterrupt (Ctrl-C) when ``interrupt``."""

    opened_with: list = []

    def __init__(self, source, *, frames=None, opens=True, interrupt=False):
        FakeCamera.opened_with.append(source)
        self.frames = list(frames or [])
        self.opens, self.interrupt = opens, interrupt

    def isOpened(self):   # noqa: N802 - OpenCV's name
        return self.opens

    def get(self, prop):
        return 0.0        # what a webcam reports for FPS / frame count: unknown

    def read(self):
        if self.frames:
            return True, self.frames.pop(0)
        if self.interrupt:
            raise KeyboardInterrupt
        return False, None

    def release(self):
        pass


def _camera(monkeypatch, **kwargs):
    FakeCamera.opened_with = []
    frames = [cv2.cvtColor(make_image(rect=r), cv2.COLOR_RGB2BGR) for r in RECTS]
    real = cv2.VideoCapture

    def fake(source):
        return FakeCamera(source, frames=frames, **kwargs) if isinstance(source, int) else real(source)

    monkeypatch.setattr(infer.cv2, "VideoCapture", fake)


@pytest.fixture
def stub(tmp_path):
    path = tmp_path / "stub.pth"
    torch.save({"model": {"score": torch.tensor(0.9)}, "meta": {"class_names": ["dark", "bright"]},
                "config": dump_config(stub_cfg())}, path)
    return path


def _frames_written(path) -> int:
    cap, count = cv2.VideoCapture(str(path)), 0
    while cap.read()[0]:
        count += 1
    cap.release()
    return count


@pytest.mark.parametrize("how", ["--source", "input", "ctrl-c"])
def test_camera_index_is_read_with_opencv(monkeypatch, tmp_path, stub, how):
    _camera(monkeypatch, interrupt=how == "ctrl-c")
    out = tmp_path / "out"
    camera = ["--source", "0"] if how == "--source" else ["0"]
    assert infer.main([str(stub), *camera, "--out", str(out), "--batch-size", "2"]) == 0
    assert FakeCamera.opened_with == [0]                        # the index, not a file named "0"
    records = [r for r in json.loads((out / "predictions.json").read_text()) if r["category_id"] == 1]
    assert [r["frame"] for r in records] == [0, 1, 2]
    for record, (x0, y0, x1, y1) in zip(records, RECTS):
        np.testing.assert_allclose(record["bbox"], [x0, y0, x1 - x0, y1 - y0], atol=1.5)
    assert _frames_written(out / "camera0.mp4") == 3


def test_no_camera_is_one_error_exit_2(monkeypatch, tmp_path, stub, capsys):
    _camera(monkeypatch, opens=False)
    assert infer.main([str(stub), "--source", "3", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: cannot open camera 3 with OpenCV (no such camera, no permission, or "
                   "another program uses it)"]
    assert FakeCamera.opened_with == [3]


def _same_class_overlaps(records, iou: float) -> int:
    if not records:
        return 0
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in records)])
    labels = torch.tensor([r["category_id"] for r in records])
    pairs = (box_iou(boxes, boxes) > iou) & (labels[:, None] == labels[None])
    return int(pairs.triu(1).sum())


def test_centernet_drawings_get_a_classwise_nms(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = build_model(TINY)
    with torch.no_grad():   # 24 px boxes on a stride-4 grid: neighbouring peaks overlap, as on photos
        model.head.wh[2].bias.fill_(24.0)
    path = tmp_path / "centernet.pth"
    torch.save({"model": model.state_dict(), "config": dump_config({"model": TINY}),
                "meta": {"class_names": ["a", "b", "c"]}}, path)
    image = tmp_path / "odd.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 255, (70, 93, 3), dtype=np.uint8))
    drawn: list = []
    real_draw = infer.draw_result

    def spy(picture, result, *args, **kwargs):
        drawn.append(result)
        return real_draw(picture, result, *args, **kwargs)

    monkeypatch.setattr(infer, "draw_result", spy)
    runs = {}
    for nms in ("default", "off"):
        out = tmp_path / nms
        extra = [] if nms == "default" else ["--nms-iou", "off"]
        assert infer.main([str(path), str(image), "--out", str(out), "--score-thr", "0", *extra]) == 0
        runs[nms] = json.loads((out / "predictions.json").read_text())
    assert runs["default"] == runs["off"]             # predictions.json: the model's own output
    raw = runs["off"]
    assert _same_class_overlaps(raw, 0.5) > 0                  # duplicates to remove
    with_nms, without = drawn
    assert len(without["boxes"]) == len(raw)
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in raw)])
    keep = batched_nms(boxes, torch.tensor([r["score"] for r in raw]),
                       torch.tensor([r["category_id"] for r in raw]), 0.5)
    expected = sorted((raw[i]["category_id"], round(raw[i]["score"], 5)) for i in keep.tolist())
    got = sorted(zip(with_nms["labels"].tolist(), (round(s, 5) for s in with_nms["scores"].tolist())))
    assert got == expected and len(got) < len(raw)


def test_drawing_nms_only_for_centernet_without_one():
    head = dict(TINY["head"])
    assert infer.drawing_nms_iou({"model": dict(TINY, head=head)}, 0.5) == 0.5
    assert infer.drawing_nms_iou({"model": dict(TINY, head=head)}, None) is None     # --nms-iou off
    assert infer.drawing_nms_iou({"model": dict(TINY, head=dict(head, nms_iou_thresh=0.7))}, 0.5) is None
    assert infer.drawing_nms_iou(stub_cfg(), 0.5) is None


def test_bad_nms_iou_is_a_usage_error(tmp_path, stub, capsys):
    with pytest.raises(SystemExit) as code:
        infer.parse_args([str(stub), "x.png", "--out", str(tmp_path), "--nms-iou", "1.5"])
    assert code.value.code == 2 and "--nms-iou must be an IoU in (0, 1] or off" in capsys.readouterr().err
