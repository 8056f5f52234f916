"""What tests/test_fuzz_readers.py found: one test per fix, each failed before it."""

import struct
import zlib

import pytest
import torch

from detkit.data.io import image_size, read_image


def _png_header_only(width: int, height: int) -> bytes:
    """An 8-bit RGB PNG whose header claims ``width x height`` with almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _tiny_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))


def test_found_a_png_beyond_opencvs_pixel_limit_is_a_read_error(tmp_path):
    from detkit.data.io import ImageReadError

    path = tmp_path / "huge.png"
    path.write_bytes(_png_header_only(40000, 40000))   # cv2.error (an assertion) before
    with pytest.raises(ImageReadError, match=r"huge.png: more pixels than OpenCV decodes"):
        read_image(path)
    with pytest.raises(ImageReadError):
        image_size(path)


def test_found_a_config_that_is_not_utf8_is_a_config_error(tmp_path):
    from detkit.config import load_config
    from detkit.registry import ConfigError

    path = tmp_path / "config.yaml"
    path.write_bytes("model: {type: X}\n".encode("utf-16"))   # UnicodeDecodeError before
    with pytest.raises(ConfigError, match=r"config.yaml: not UTF-8 text \(byte 0\)"):
        load_config(path)


def test_found_a_checkpoint_whose_stored_config_is_not_yaml(tmp_path):
    from detkit.inference import _resolve_config
    from detkit.registry import ConfigError

    with pytest.raises(ConfigError, match="m.pth: the stored config is not valid YAML"):
        _resolve_config(None, {"config": "model: [1, 2"}, "m.pth")   # yaml.ParserError before


def test_found_load_from_weights_that_are_not_tensors(tmp_path):
    from detkit.engine.checkpoint import CheckpointError, load_model_weights

    with pytest.raises(CheckpointError, match="m.pth: not a state dict of tensors: '0.weight' is a NoneType"):
        load_model_weights(_tiny_model(), {"0.weight": None}, source="m.pth", allow_mismatch=True)
    with pytest.raises(CheckpointError, match="the weights are a list"):
        load_model_weights(_tiny_model(), [1], source="m.pth")   # AttributeError before


def test_found_a_voc_size_of_inf_names_the_file(tmp_path):
    from detkit.data.voc import parse_voc_xml

    xml = tmp_path / "x.xml"
    xml.write_text("<annotation><size><width>20</width><height>inf</height></size></annotation>")
    with pytest.raises(ValueError, match=r"x.xml: <height> is inf, expected a size"):   # OverflowError before
        parse_voc_xml(xml, {"cat": 0})


def test_found_a_yolo_class_index_of_inf_is_a_dataset_error(tmp_path):
    from detkit.data.yolo import parse_yolo_txt
    from detkit.errors import DatasetError

    txt = tmp_path / "a.txt"
    txt.write_text("0 0.5 0.5 0.1 0.1\ninf 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetError, match=r"a.txt:2: not numbers: 'inf 0.5"):   # OverflowError before
        parse_yolo_txt(txt, 2)
