"""read_image: conversions to 8-bit RGB, EXIF orientation, and errors that name the file."""

import io

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from detkit.data.io import ImageReadError, image_size, read_image, read_mask


def _pattern(h=24, w=40):
    """An RGB image whose every quadrant differs, so any flip / rotation is visible."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (250, 10, 10)
    img[: h // 2, w // 2:] = (10, 250, 10)
    img[h // 2:, : w // 2] = (10, 10, 250)
    img[h // 2:, w // 2:] = (240, 240, 20)
    return img


def test_rgb_png_channel_order(tmp_path):
    img = _pattern()
    Image.fromarray(img).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (24, 40, 3)
    np.testing.assert_array_equal(out, img)


def test_grayscale_and_palette(tmp_path):
    gray = np.arange(24 * 40, dtype=np.uint8).reshape(24, 40)
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=2))
    pal = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 200, 30, 40, 5, 150, 250] + [0] * (256 * 3 - 9))
    pal.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    expected = np.array(pal.convert("RGB"))
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png"), [[0, 1], [2, 1]])   # indices, not colours


def test_rgba_drops_alpha(tmp_path):
    rgba = np.concatenate([_pattern(), np.full((24, 40, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), _pattern())


def test_16bit_scaled_to_8bit(tmp_path):
    values = np.array([[0, 257, 1000, 65535]], np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), values)
    out = read_image(tmp_path / "g16.png")
    expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)   # 0, 1, 4, 255
    np.testing.assert_array_equal(out[..., 0], expected)
    rgb16 = np.zeros((2, 3, 3), np.uint16)
    rgb16[..., 0] = 65535                      # red in RGB -> stored as the last channel in BGR
    cv2.imwrite(str(tmp_path / "c16.png"), cv2.cvtColor(rgb16, cv2.COLOR_RGB2BGR))
    np.testing.assert_array_equal(read_image(tmp_path / "c16.png")[0, 0], [255, 0, 0])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pil_and_opencv(tmp_path, orientation):
    path = tmp_path / f"o{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(_pattern()).save(path, quality=95, exif=exif)
    out = read_image(path)
    with Image.open(path) as im:
        reference = np.array(ImageOps.exif_transpose(im).convert("RGB"))
    assert out.shape == reference.shape
    assert np.abs(out.astype(int) - reference.astype(int)).mean() < 4   # two JPEG decoders
    # OpenCV's own EXIF handling (IMREAD_COLOR) decodes with the same library: equal pixels.
    expected = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(out, expected)
    assert image_size(path) == out.shape[:2]


def test_exif_rotated_shape_and_content(tmp_path):
    path = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6                           # stored landscape, displayed rotated 90 degrees clockwise
    Image.fromarray(_pattern(24, 40)).save(path, quality=95, exif=exif)
    out = read_image(path)
    assert out.shape == (40, 24, 3)
    # After a clockwise turn the stored top-left (red) quadrant is at the top right.
    assert out[5, 20, 0] > 200 and out[5, 20, 1] < 60


def test_missing_truncated_and_garbage_files_name_the_file(tmp_path):
    with pytest.raises(ImageReadError, match="nope.jpg"):
        read_image(tmp_path / "nope.jpg")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.jpg"):
        read_image(tmp_path / "cut.jpg")
    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    with pytest.raises(ImageReadError, match="junk.png"):
        read_image(tmp_path / "junk.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.png"):   # ImageReadError is a ValueError
        read_image(tmp_path / "empty.png")
    png = cv2.imencode(".png", _pattern())[1].tobytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) - 30])
    with pytest.raises(ImageReadError, match="cut.png"):
        read_image(tmp_path / "cut.png")


def test_png_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(_pattern()).save(tmp_path / "e.png", exif=exif)
    with Image.open(tmp_path / "e.png") as im:
        reference = np.array(ImageOps.exif_transpose(im).convert("RGB"))
    np.testing.assert_array_equal(read_image(tmp_path / "e.png"), reference)   # lossless: exact
