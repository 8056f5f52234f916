"""Readers that never crash: every file a user hands detkit loads or raises detkit's one-line error.

Hypothesis generates COCO json, VOC xml, YOLO txt and data.yaml, segmentation PNGs, images
(truncated, bit-flipped, wrong extension, 0-byte, 16-bit, CMYK, huge dimensions), configs (YAML,
with ``--set`` overrides) and checkpoints, mostly well-formed with a few broken fields so that
the readers get past their first check. Each input goes through the path a user's does (the
registry's ``build_dataset``, every sample read, ``load_config``, the Predictor's checkpoint
steps) and must end in a result or in one of :data:`detkit.cli.USER_ERRORS` (``DetkitError``
and its subclasses, or a missing file), which the tools print as one ``error:`` line. Any other
exception, or an input taking more than ``HANG_SECONDS``, fails the test with the input.

The default suite runs ``DETKIT_FUZZ_EXAMPLES`` (default 20) derandomized examples per reader, a
few seconds in all. The long run draws new random inputs each time::

    DETKIT_FUZZ_EXAMPLES=5000 python -m pytest -q tests/test_fuzz_readers.py --hypothesis-show-statistics
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from xml.sax.saxutils import escape

import cv2
import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from detkit.cli import USER_ERRORS
from detkit.data.io import IMAGE_EXTENSIONS, image_size, read_image

EXAMPLES = int(os.environ.get("DETKIT_FUZZ_EXAMPLES", "20"))
HANG_SECONDS = 20
FUZZ = settings(max_examples=EXAMPLES, derandomize="DETKIT_FUZZ_EXAMPLES" not in os.environ,
                deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
pytestmark = pytest.mark.filterwarnings("ignore")   # readers warn about what they clip or skip


class Hang(BaseException):
    """Raised by the alarm: a BaseException, so that no reader's ``except Exception`` hides it."""


@contextmanager
def _time_limit(seconds: float):
    def alarm(signum, frame):
        raise Hang(f"no result after {seconds} s")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def loads_or_user_error(fn):
    """``fn()``'s result, or None when it raised a user error with a message."""
    with _time_limit(HANG_SECONDS):
        try:
            return fn()
        except USER_ERRORS as e:
            assert str(e).strip(), f"{type(e).__name__} without a message"
            return None


# ------------------------------------------------------------------------------ building blocks
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**40),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6))
any_json = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)


def mostly(valid, rate: int = 6):
    """``valid`` most of the time, sometimes any json value (a field of the wrong type)."""
    return st.one_of(*([valid] * rate), any_json)


number = st.one_of(st.floats(-50, 120), st.integers(-5, 100), st.just(float("nan")),
                   st.just(float("inf")), st.floats(0, 1e12))
files = st.sampled_from(["a.png", "b.jpg", "missing.png", "sub/../a.png", "", "a.PNG"])


def _png_bytes(array: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", array)
    assert ok
    return data.tobytes()


def _write_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / "a.png"), np.full((24, 32, 3), 90, np.uint8))
    cv2.imwrite(str(folder / "b.jpg"), np.full((30, 20, 3), 160, np.uint8))


def _all_samples(dataset, limit: int = 4) -> None:
    for i in range(min(len(dataset), limit)):
        dataset[i]


def _build(root: Path, dataset_cfg: dict):
    from detkit.data import build_dataset

    dataset = build_dataset({"dataset": dataset_cfg}, root=str(root), path="data.train")
    _all_samples(dataset)
    return dataset


# ------------------------------------------------------------------------------ COCO json
polygon = st.lists(number, min_size=0, max_size=10)
segmentation = st.one_of(st.lists(polygon, max_size=2),
                         st.fixed_dictionaries({"size": mostly(st.lists(st.integers(0, 40), min_size=2,
                                                                        max_size=2)),
                                                "counts": mostly(st.one_of(st.text(max_size=8),
                                                                           st.lists(st.integers(0, 900),
                                                                                    max_size=6)))}))
coco_image = st.fixed_dictionaries(
    {"id": mostly(st.integers(0, 4)), "file_name": mostly(files)},
    optional={"height": mostly(st.integers(0, 40)), "width": mostly(st.integers(0, 40))})
coco_ann = st.fixed_dictionaries(
    {"id": mostly(st.integers(0, 20)), "image_id": mostly(st.integers(0, 4)),
     "category_id": mostly(st.integers(0, 3)), "bbox": mostly(st.lists(number, min_size=4, max_size=4))},
    optional={"iscrowd": mostly(st.integers(0, 1)), "area": mostly(number),
              "segmentation": mostly(segmentation), "ignore": st.integers(0, 1)})
coco_cat = st.fixed_dictionaries({"id": mostly(st.integers(0, 3))},
                                 optional={"name": mostly(st.text(max_size=5))})
coco_doc = st.fixed_dictionaries(
    {"images": mostly(st.lists(coco_image, max_size=3)),
     "annotations": mostly(st.lists(coco_ann, max_size=5)),
     "categories": mostly(st.lists(coco_cat, max_size=3))})
coco_text = st.one_of(*[coco_doc.map(json.dumps)] * 6, st.text(max_size=40), any_json.map(json.dumps))


@FUZZ
@given(text=coco_text, masks=st.sampled_from(["none", "with_masks", "instance_masks"]))
def test_coco_json(text, masks):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write_images(root / "images")
        (root / "ann.json").write_text(text, encoding="utf-8")
        cfg = {"type": "CocoDetection", "img_dir": "images", "ann_file": "ann.json"}
        if masks != "none":
            cfg[masks] = True
        loads_or_user_error(lambda: _build(root, cfg))


# ------------------------------------------------------------------------------ VOC xml
def _xml_value(draw_text: str, raw: bool) -> str:
    return draw_text if raw else escape(draw_text)


voc_field = st.one_of(number.map(str), st.integers(-3, 60).map(str), st.text(max_size=5))


@st.composite
def voc_xml(draw):
    raw = draw(st.integers(0, 9)) == 0                       # sometimes unescaped: malformed XML
    def value(strategy=voc_field):
        return _xml_value(draw(strategy), raw)
    objects = []
    for _ in range(draw(st.integers(0, 3))):
        box = "".join(f"<{t}>{value()}</{t}>" for t in draw(st.permutations(["xmin", "ymin", "xmax", "ymax"]))
                      [: draw(st.integers(2, 4))])
        name = value(st.sampled_from(["cat", "dog", "cat ", "bird", ""]))
        with_box = draw(st.booleans()) or draw(st.booleans())
        objects.append(f"<object><name>{name}</name><difficult>{value()}</difficult>"
                       + (f"<bndbox>{box}</bndbox>" if with_box else "") + "</object>")
    size = "" if draw(st.integers(0, 4)) == 0 else \
        f"<size><width>{value()}</width><height>{value()}</height></size>"
    return f"<annotation>{size}{''.join(objects)}</annotation>"


@FUZZ
@given(xml=st.one_of(*[voc_xml()] * 5, st.text(max_size=30)), image=st.sampled_from(["a.png", "none"]))
def test_voc_xml(xml, image):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "ImageSets" / "Main").mkdir(parents=True)
        (root / "ImageSets" / "Main" / "trainval.txt").write_text("x\n")
        (root / "Annotations").mkdir()
        (root / "Annotations" / "x.xml").write_text(xml, encoding="utf-8")
        _write_images(root / "images")
        (root / "JPEGImages").mkdir()
        if image != "none":
            (root / "images" / image).rename(root / "JPEGImages" / "x.png")
        loads_or_user_error(lambda: _build(root, {"type": "VOCDetection", "root": str(root), "year": None,
                                                  "img_ext": ".png", "class_names": ["cat", "dog"]}))


# ------------------------------------------------------------------------------ YOLO txt, data.yaml
yolo_line = st.one_of(
    st.tuples(st.integers(-1, 3), *[number] * 4).map(lambda t: " ".join(map(str, t))),
    st.lists(number, min_size=1, max_size=9).map(lambda v: "0 " + " ".join(map(str, v))),
    st.text(max_size=12))
yolo_text = st.lists(yolo_line, max_size=4).map("\n".join)
data_yaml = st.fixed_dictionaries(
    {"names": mostly(st.one_of(st.lists(st.text(max_size=4), max_size=3),
                               st.dictionaries(st.integers(-1, 3), st.text(max_size=4), max_size=3)))},
    optional={"path": mostly(st.sampled_from([".", "", "missing", "/nonexistent"])),
              "train": mostly(st.sampled_from(["images/train", "list.txt", "missing", ["images/train"]])),
              "val": mostly(st.sampled_from(["images/train", "missing"])),
              "nc": mostly(st.integers(-1, 4))})


def _yaml_text(doc) -> str:
    return yaml.safe_dump(doc, allow_unicode=True)


@FUZZ
@given(label=st.one_of(yolo_text, st.binary(max_size=20).map(lambda b: b.decode("latin-1"))),
       doc=st.one_of(*[data_yaml.map(_yaml_text)] * 4, st.text(max_size=30)),
       split=st.sampled_from(["train", "val", "test"]))
def test_yolo_txt_and_data_yaml(label, doc, split):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write_images(root / "images" / "train")
        (root / "labels" / "train").mkdir(parents=True)
        (root / "labels" / "train" / "a.txt").write_text(label, encoding="utf-8")
        (root / "list.txt").write_text("images/train/a.png\nimages/train/nothing.png\n")
        (root / "data.yaml").write_text(doc, encoding="utf-8")
        loads_or_user_error(lambda: _build(root, {"type": "YoloDetection", "img_dir": "images/train",
                                                  "label_dir": "labels/train", "class_names": ["a", "b"]}))
        loads_or_user_error(lambda: _build(root, {"type": "YoloDetection", "data_yaml": "data.yaml",
                                                  "split": split}))


# ------------------------------------------------------------------------------ segmentation PNGs
@st.composite
def mask_file(draw) -> bytes:
    h, w = draw(st.sampled_from([(24, 32), (24, 31), (1, 1), (32, 24)]))
    mode = draw(st.sampled_from(["L", "P", "I;16", "RGB", "RGBA", "1", "F"]))
    values = draw(st.sampled_from([[0, 1, 2], [0, 255], [0, 7, 200], [0, 300, 65535]]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    array = rng.choice(values, size=(h, w))
    if mode in ("L", "P"):
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L")
        image = image.convert("P") if mode == "P" else image
    elif mode == "I;16":
        image = Image.fromarray(array.astype(np.uint16))
    elif mode == "F":
        image = Image.fromarray(array.astype(np.float32))
    else:
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).convert(mode)
    out = io.BytesIO()
    image.save(out, format="TIFF" if mode == "F" else "PNG")
    data = out.getvalue()
    cut = draw(st.sampled_from([None, None, None, 0, 20, -5]))
    return data if cut is None else data[:cut]


@FUZZ
@given(mask=mask_file(), mask_values=st.sampled_from([None, [0, 1, 2], [0, 7, 200], [0, 0, 1]]))
def test_segmentation_png(mask, mask_values):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write_images(root / "images")
        (root / "masks").mkdir()
        (root / "masks" / "a.png").write_bytes(mask)
        (root / "masks" / "b.png").write_bytes(_png_bytes(np.zeros((30, 20), np.uint8)))
        cfg = {"type": "SemanticSegDataset", "img_dir": "images", "mask_dir": "masks",
               "class_names": ["bg", "x", "y"], "mask_values": mask_values}
        loads_or_user_error(lambda: _build(root, cfg))


# ------------------------------------------------------------------------------ images
def _png_header_only(width: int, height: int, depth: int = 8, color: int = 2) -> bytes:
    """A PNG whose header claims ``width x height`` with almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@st.composite
def encoded_image(draw) -> bytes:
    kind = draw(st.sampled_from(["cv2", "cv2", "cv2", "cmyk", "huge", "random", "empty"]))
    if kind == "empty":
        return b""
    if kind == "random":
        return draw(st.binary(max_size=64))
    if kind == "huge":
        return _png_header_only(draw(st.sampled_from([1, 40000, 2**31 - 1])),
                                draw(st.sampled_from([1, 40000, 2**31 - 1])),
                                *draw(st.sampled_from([(8, 2), (16, 2), (8, 0), (1, 0), (8, 6)])))
    h, w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if kind == "cmyk":
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 4), dtype=np.uint8), mode="CMYK").save(out, "JPEG")
        data = out.getvalue()
    else:
        ext = draw(st.sampled_from([".png", ".jpg", ".bmp", ".tiff", ".webp"]))
        channels = draw(st.sampled_from([1, 3, 4]))
        dtype = np.uint16 if ext in (".png", ".tiff") and draw(st.booleans()) else np.uint8
        array = rng.integers(0, np.iinfo(dtype).max, (h, w, channels), dtype=dtype)
        if ext in (".jpg", ".bmp") and channels == 4:
            array = array[:, :, :3]
        ok, encoded = cv2.imencode(ext, array)
        assert ok
        data = encoded.tobytes()
    damage = draw(st.sampled_from(["none", "none", "truncate", "flip", "prefix"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif damage == "flip":
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            buf[draw(st.integers(0, len(buf) - 1))] ^= 1 << draw(st.integers(0, 7))
        data = bytes(buf)
    elif damage == "prefix":
        data = draw(st.binary(min_size=1, max_size=8)) + data
    return data


@FUZZ
@given(data=encoded_image(), ext=st.sampled_from([*IMAGE_EXTENSIONS, ".txt", ""]))
def test_images(data, ext):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"image{ext}"
        path.write_bytes(data)
        image = loads_or_user_error(lambda: read_image(path))
        size = loads_or_user_error(lambda: image_size(path))
        if image is not None:
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            # Datasets compare the annotated size with the header size: both readers must agree.
            assert size == image.shape[:2]


# ------------------------------------------------------------------------------ configs
config_key = st.sampled_from(["model", "type", "_base_", "data", "train", "root", "max_iters",
                              "_delete_", "num_classes", "lr", "evaluation", "x"])
config_value = st.recursive(
    st.one_of(json_scalar, st.sampled_from(["base.yaml", "missing.yaml", "config.yaml", "1e-4"])),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(config_key, inner, max_size=4),
    max_leaves=10)
config_text = st.one_of(
    *[st.dictionaries(config_key, config_value, max_size=5).map(_yaml_text)] * 4,
    st.text(max_size=40),
    st.sampled_from(["!!python/object:os.system {}", "a: !!python/name:os.system", "a: [1, 2",
                     "\t- x", "a: 1\na: 2", "&a [*a]", "a: *undefined"]),
    st.binary(max_size=30).map(lambda b: b.decode("latin-1")))
override = st.one_of(st.tuples(st.lists(config_key, min_size=1, max_size=3).map(".".join),
                               st.text(max_size=6)).map("=".join),
                     st.text(max_size=10), st.sampled_from(["train.max_iters=[", "model=null", "a.0.b=1"]))


@FUZZ
@given(text=config_text, base=st.one_of(st.none(), config_text), overrides=st.lists(override, max_size=3),
       encoding=st.sampled_from(["utf-8", "utf-8", "latin-1", "utf-16"]))
def test_configs(text, base, overrides, encoding):
    from detkit.config import load_config
    from detkit.engine.setup import train_settings

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "config.yaml").write_bytes(text.encode(encoding, errors="replace"))
        if base is not None:
            (root / "base.yaml").write_text(base, encoding="utf-8")
        cfg = loads_or_user_error(lambda: load_config(root / "config.yaml", overrides))
        if cfg is not None:
            loads_or_user_error(lambda: train_settings(cfg))


# ------------------------------------------------------------------------------ checkpoints
def _tiny_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))


tensor_value = st.sampled_from([torch.zeros(4, 3, 3, 3), torch.zeros(4), torch.zeros(2, 2),
                                torch.zeros((), dtype=torch.int64), torch.zeros(4, dtype=torch.float16)])
state_key = st.sampled_from(["0.weight", "0.bias", "1.weight", "1.running_mean", "1.num_batches_tracked",
                             "module.0.weight", "x"])
checkpoint_doc = st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.dictionaries(state_key, st.one_of(tensor_value, json_scalar), max_size=5),
                       any_json),
    "ema": st.one_of(st.dictionaries(state_key, tensor_value, max_size=3), st.none(), any_json),
    "meta": st.one_of(st.fixed_dictionaries({}, optional={
        "class_names": mostly(st.lists(st.text(max_size=4), max_size=3)),
        "label_to_cat_id": mostly(st.lists(st.integers(-1, 5), max_size=3)),
        "detkit_version": mostly(st.text(max_size=5))}), any_json),
    "config": st.one_of(config_text, any_json),
    "iter": mostly(st.integers(0, 10))})


@st.composite
def checkpoint_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["torch", "torch", "torch", "bare", "random", "empty"]))
    if kind == "empty":
        return b""
    if kind == "random":
        return draw(st.binary(max_size=64))
    out = io.BytesIO()
    obj = draw(checkpoint_doc) if kind == "torch" else draw(st.one_of(
        st.dictionaries(state_key, tensor_value, max_size=4), st.lists(tensor_value, max_size=2),
        json_scalar))
    torch.save(obj, out)
    data = out.getvalue()
    damage = draw(st.sampled_from(["none", "none", "none", "truncate", "flip"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "flip":
        buf = bytearray(data)
        buf[draw(st.integers(0, len(buf) - 1))] ^= 0xFF
        data = bytes(buf)
    return data


@FUZZ
@given(data=checkpoint_bytes())
def test_checkpoints(data):
    from detkit.engine.checkpoint import inference_state_dict, load_checkpoint, load_model_weights
    from detkit.inference import _resolve_config, apply_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pth"
        path.write_bytes(data)
        ckpt = loads_or_user_error(lambda: load_checkpoint(path))
        if ckpt is None:
            return
        # What Predictor / tools/infer.py do with it, and what train.load_from does.
        loads_or_user_error(lambda: apply_checkpoint(_tiny_model(), ckpt, path))
        loads_or_user_error(lambda: _resolve_config(None, ckpt, path))
        loads_or_user_error(lambda: load_model_weights(_tiny_model(), inference_state_dict(ckpt),
                                                       source=str(path), allow_mismatch=True,
                                                       log=lambda msg: None))

