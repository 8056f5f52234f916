"""DetectionConfusionMatrix against a hand-counted example (rows ground truth, columns prediction)."""

import numpy as np
import pytest
import torch

from detkit.evaluation.confusion import DetectionConfusionMatrix

CAT, DOG, BIRD, BG = 0, 1, 2, 3


def _target(image_id, boxes, labels, iscrowd=None, scale=(1.0, 1.0), offset=(0.0, 0.0)):
    n = len(labels)
    return {"image_id": image_id, "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "iscrowd": torch.tensor(iscrowd if iscrowd is not None else [False] * n),
            "scale": torch.tensor(scale), "offset": torch.tensor(offset)}


def _pred(boxes, labels, scores):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "scores": torch.tensor(scores, dtype=torch.float32)}


def _hand_built_batch():
    # Image 1: a found cat, a dog found by a dog box (IoU 0.6) and also hit by a better-overlapping
    # cat box (IoU 0.8), a bird found only below the score threshold, a crowd region with a bird
    # box on it, and a dog box on nothing.
    image1 = _target(1, [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 80, 80]],
                     [CAT, DOG, BIRD, CAT], iscrowd=[False, False, False, True])
    pred1 = _pred([[0, 0, 10, 10], [20, 20, 30, 26], [20, 20, 30, 28], [40, 40, 50, 50],
                   [60, 60, 80, 80], [100, 100, 110, 110]],
                  [CAT, DOG, CAT, BIRD, BIRD, DOG], [0.9, 0.7, 0.8, 0.1, 0.6, 0.5])
    # Image 2: the pipeline resized by 2 and shifted by 5 px; the cat box is right in original pixels.
    image2 = _target(2, [[5, 5, 25, 25]], [CAT], scale=(2.0, 2.0), offset=(5.0, 5.0))
    pred2 = _pred([[0, 0, 10, 10]], [CAT], [0.95])
    # Image 3: a dog detected as a bird; an image with no objects and one false bird.
    image3 = _target(3, [[0, 0, 10, 10]], [DOG])
    pred3 = _pred([[0, 0, 10, 9]], [BIRD], [0.5])
    image4 = _target(4, [], [])
    pred4 = _pred([[5, 5, 9, 9]], [BIRD], [0.99])
    return [image1, image2, image3, image4], [pred1, pred2, pred3, pred4]


def test_hand_built_example():
    cm = DetectionConfusionMatrix(num_classes=3, class_names=["cat", "dog", "bird"])
    targets, preds = _hand_built_batch()
    cm.process(targets[:2], preds[:2])
    cm.process(targets[2:], preds[2:])
    expected = np.zeros((4, 4), np.int64)
    expected[CAT, CAT] = 2     # image 1 and image 2 (mapped back from the transformed frame)
    expected[DOG, DOG] = 1     # the same-class box wins over the better-overlapping cat box
    expected[DOG, BIRD] = 1    # image 3: class confusion, off the diagonal
    expected[BIRD, BG] = 1     # missed bird (its box scored below 0.25): background column
    expected[BG, CAT] = 1      # the cat box on the dog, left over: background row
    expected[BG, DOG] = 1      # dog box on nothing
    expected[BG, BIRD] = 1     # image 4: bird on an empty image; the bird on the crowd is ignored
    np.testing.assert_array_equal(cm.evaluate(), expected)
    assert cm.names == ["cat", "dog", "bird", "background"]


def test_thresholds_change_the_counts():
    targets, preds = _hand_built_batch()
    low = DetectionConfusionMatrix(num_classes=3, score_thr=0.05)
    low.process(targets, preds)
    assert low.evaluate()[BIRD, BIRD] == 1 and low.matrix[BIRD, BG] == 0   # the 0.1 bird counts
    strict = DetectionConfusionMatrix(num_classes=3, iou_thr=0.7)
    strict.process(targets, preds)
    m = strict.evaluate()
    # At IoU 0.7 the dog box (0.6) no longer matches, the cat box (0.8) does: a confusion.
    assert m[DOG, CAT] == 1 and m[DOG, DOG] == 0 and m[BG, DOG] == 2


def test_an_image_seen_twice_counts_once_and_reset_clears():
    targets, preds = _hand_built_batch()
    cm = DetectionConfusionMatrix(num_classes=3)
    cm.process(targets, preds)
    once = cm.evaluate().copy()
    cm.process(targets[:1], preds[:1])   # DistributedSampler padding repeats images
    np.testing.assert_array_equal(cm.evaluate(), once)
    cm.reset()
    assert cm.evaluate().sum() == 0


def test_out_of_range_label_is_an_error():
    cm = DetectionConfusionMatrix(num_classes=2)
    with pytest.raises(ValueError, match="predicted label 5"):
        cm.process([_target(1, [[0, 0, 4, 4]], [0])], [_pred([[0, 0, 4, 4]], [5], [0.9])])
