"""detkit.visualize: boxes land on their pixels in the class colour, captions, mask blending."""

import numpy as np
import pytest
import torch

from detkit.visualize import blend_sem_seg, class_color, draw_boxes, draw_result


def _gray(h=120, w=160, v=0):
    return np.full((h, w, 3), v, np.uint8)


def test_class_colours_distinct_and_stable():
    colours = [class_color(i) for i in range(80)]
    assert colours == [class_color(i) for i in range(80)]          # deterministic
    assert len(set(colours[:20])) == 20
    for c in colours:
        assert all(0 <= v <= 255 for v in c)
    # Neighbouring labels must be easy to tell apart (max channel difference).
    for a, b in zip(colours[:20], colours[1:21]):
        assert max(abs(x - y) for x, y in zip(a, b)) >= 60


def test_box_outline_on_the_right_pixels():
    image = _gray()
    out = draw_boxes(image, torch.tensor([[40.0, 50.0, 100.0, 90.0]]), torch.tensor([2]),
                     torch.tensor([0.9]), ["a", "b", "c"], thickness=1)
    colour = np.array(class_color(2))
    assert (out[70, 40] == colour).all()     # left edge
    assert (out[70, 99] == colour).all()     # right edge (last pixel inside xyxy)
    assert (out[89, 70] == colour).all()     # bottom edge
    assert (out[70, 70] == 0).all()          # interior untouched
    assert (out[70, 20] == 0).all() and (out[70, 110] == 0).all()
    assert (image == 0).all()                # input untouched
    # The caption (filled in the class colour) sits just above the box's top-left corner.
    assert (out[45:50, 40:50] == colour).all(axis=-1).any()


def test_caption_text_differs_by_name_and_score():
    boxes, labels = np.array([[10, 40, 80, 100]], np.float32), np.array([0])
    a = draw_boxes(_gray(), boxes, labels, np.array([0.5]), ["cat"])
    b = draw_boxes(_gray(), boxes, labels, np.array([0.5]), ["dog"])
    c = draw_boxes(_gray(), boxes, labels, np.array([0.9]), ["cat"])
    assert (a != b).any() and (a != c).any()
    d = draw_boxes(_gray(), boxes, labels, None, None)   # no scores, no names: label number
    assert (d != 0).any()


def test_box_at_top_border_keeps_caption_inside():
    out = draw_boxes(_gray(64, 64), np.array([[0, 0, 30, 30]]), np.array([1]), np.array([0.8]), ["x"])
    assert out.shape == (64, 64, 3)
    assert (out[0:8, 0:20] == np.array(class_color(1))).all(axis=-1).any()


def test_draw_result_threshold_and_empty():
    result = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 100.0, 100.0]]),
              "scores": torch.tensor([0.9, 0.1]), "labels": torch.tensor([0, 1])}
    out = draw_result(_gray(), result, ["a", "b"], score_thr=0.5)
    assert (out[30, 10] == np.array(class_color(0))).all()
    assert (out[80, 60] == 0).all()          # low-score box not drawn
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    assert (draw_result(_gray(), empty) == 0).all()


def test_blend_sem_seg_formula_and_ignore():
    image = np.full((4, 6, 3), 100, np.uint8)
    seg = np.array([[0, 1, 2, 255, 1, 0]] * 4)
    out = blend_sem_seg(image, torch.from_numpy(seg), alpha=0.25, skip_labels=(0,))
    for col, label in enumerate(seg[0]):
        if label in (0, 255):
            assert (out[:, col] == 100).all()
        else:
            expected = np.round(0.75 * 100 + 0.25 * np.array(class_color(int(label))))
            assert (out[:, col] == expected).all()
    with pytest.raises(ValueError, match="mask shape"):
        blend_sem_seg(image, np.zeros((3, 3), np.int64))


def test_bad_image_rejected():
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        draw_boxes(np.zeros((10, 10), np.uint8), np.zeros((0, 4)), np.zeros(0))
