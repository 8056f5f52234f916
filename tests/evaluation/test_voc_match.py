"""The vectorised VOC matcher equals the devkit's loop on random cases with ties, duplicates,
difficult boxes, images without ground truth and IoU ties between ground-truth boxes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_voc import ref_voc_eval

from detkit.evaluation import VOCEvaluator, voc_eval_class


def random_case(rng: np.random.Generator):
    gt, dets = {}, []
    for img in range(int(rng.integers(1, 7))):
        objs = []
        for _ in range(int(rng.integers(0, 5))):
            x, y = rng.integers(0, 40, 2).astype(float)
            box = [x, y, x + float(rng.integers(4, 20)), y + float(rng.integers(4, 20))]
            objs.append((box, int(rng.integers(0, 2)), bool(rng.random() < 0.25)))
            if rng.random() < 0.2:
                objs.append((list(box), objs[-1][1], False))  # an identical box: IoU tie
        gt[img] = objs
        for _ in range(int(rng.integers(0, 7))):
            if objs and rng.random() < 0.7:
                b = [v + float(rng.integers(-3, 4)) for v in objs[int(rng.integers(len(objs)))][0]]
            else:
                x, y = rng.integers(0, 40, 2).astype(float)
                b = [x, y, x + 8.0, y + 8.0]
            dets.append((img, int(rng.integers(0, 2)), float(rng.integers(0, 5)) / 4, b))  # score ties
    return gt, dets


@pytest.mark.parametrize("legacy", [False, True])
def test_vectorised_matching_equals_devkit_loop(legacy):
    rng = np.random.default_rng(7)
    for _ in range(150):
        gt, dets = random_case(rng)
        for c in range(2):
            g = {i: (np.array([o[0] for o in objs if o[1] == c]).reshape(-1, 4),
                     np.array([o[2] for o in objs if o[1] == c], bool)) for i, objs in gt.items()}
            d = {}
            for img, lab, score, box in dets:
                if lab == c:
                    b, s = d.get(img, (np.zeros((0, 4)), np.zeros(0)))
                    d[img] = (np.vstack([b, box]), np.append(s, score))
            ref = ref_voc_eval(gt, dets, c, use_07=False, plus_one=legacy)
            ap = voc_eval_class(d, g, metric="voc12", legacy_coords=legacy)[2]
            assert ap == pytest.approx(ref, abs=1e-12, nan_ok=True)


def test_evaluator_without_images_or_detections():
    ev = VOCEvaluator(class_names=["a", "b"])
    assert math.isnan(ev.evaluate()["voc/mAP"])
    assert voc_eval_class({}, {1: (np.zeros((1, 4)) + [0, 0, 5, 5], np.zeros(1, bool))})[2] == 0.0
