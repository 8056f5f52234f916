"""VOCEvaluator against a written-out reference of the VOC devkit's ``voc_eval`` algorithm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detkit.evaluation import VOCEvaluator, build_evaluator, voc_ap

from evaluation_helpers import CLASSES, DETS, GT


# ---------------------------------------------------------------- reference (devkit, loop style)
def ref_ap(rec, prec, use_07):
    if use_07:
        ap = 0.0
        for t in [i / 10 for i in range(11)]:
            ps = [p for r, p in zip(rec, prec) if r >= t]
            ap += (max(ps) if ps else 0.0) / 11.0
        return ap
    mrec = [0.0] + list(rec) + [1.0]
    mpre = [0.0] + list(prec) + [0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return sum((mrec[i + 1] - mrec[i]) * mpre[i + 1] for i in range(len(mrec) - 1) if mrec[i + 1] != mrec[i])


def ref_voc_eval(gt, dets, cls, ovthresh=0.5, use_07=True, plus_one=True):
    """gt: {img: [(box, label, difficult)]}; dets: [(img, label, score, box)]."""
    one = 1.0 if plus_one else 0.0
    recs, npos = {}, 0
    for img, objs in gt.items():
        boxes = [o[0] for o in objs if o[1] == cls]
        diff = [o[2] for o in objs if o[1] == cls]
        npos += sum(1 for d in diff if not d)
        recs[img] = {"bbox": boxes, "difficult": diff, "det": [False] * len(boxes)}
    mine = sorted([d for d in dets if d[1] == cls], key=lambda d: -d[2])
    tp, fp = [], []
    for img, _, _, bb in mine:
        r = recs[img]
        ovmax, jmax = -1.0, -1
        for j, g in enumerate(r["bbox"]):
            iw = max(min(bb[2], g[2]) - max(bb[0], g[0]) + one, 0.0)
            ih = max(min(bb[3], g[3]) - max(bb[1], g[1]) + one, 0.0)
            inter = iw * ih
            uni = ((bb[2] - bb[0] + one) * (bb[3] - bb[1] + one)
                   + (g[2] - g[0] + one) * (g[3] - g[1] + one) - inter)
            if inter / uni > ovmax:
                ovmax, jmax = inter / uni, j
        t = f = 0
        if ovmax > ovthresh:
            if not r["difficult"][jmax]:
                if not r["det"][jmax]:
                    t, r["det"][jmax] = 1, True
                else:
                    f = 1
        else:
            f = 1
        tp.append(t)
        fp.append(f)
    if npos == 0:
        return float("nan")
    ctp, cfp, rec, prec = 0, 0, [], []
    for t, f in zip(tp, fp):
        ctp, cfp = ctp + t, cfp + f
        rec.append(ctp / npos)
        prec.append(ctp / max(ctp + cfp, np.finfo(np.float64).eps))
    return ref_ap(rec, prec, use_07)



def run(evaluator, gt=GT, dets=DETS):
    evaluator.reset()
    for img in sorted(gt):
        objs = gt[img]
        mine = [d for d in dets if d[0] == img]
        target = {"image_id": img,
                  "boxes": torch.tensor([o[0] for o in objs], dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.tensor([o[1] for o in objs]),
                  "difficult": torch.tensor([o[2] for o in objs])}
        pred = {"boxes": torch.tensor([d[3] for d in mine], dtype=torch.float32).reshape(-1, 4),
                "scores": torch.tensor([d[2] for d in mine]), "labels": torch.tensor([d[1] for d in mine],
                                                                                     dtype=torch.int64)}
        evaluator.process([target], [pred])
    return evaluator.evaluate()


@pytest.mark.parametrize("metric", ["voc07", "voc12"])
@pytest.mark.parametrize("legacy", [True, False])
def test_hand_made_case_equals_reference(metric, legacy):
    m = run(VOCEvaluator(class_names=CLASSES, metric=metric, legacy_coords=legacy))
    for c, name in enumerate(CLASSES[:2]):
        ref = ref_voc_eval(GT, DETS, c, use_07=metric == "voc07", plus_one=legacy)
        assert m[f"voc/AP-{name}"] == pytest.approx(ref, abs=1e-12)
    assert math.isnan(m["voc/AP-bird"])  # no GT -> NaN, left out of the mean
    assert m["voc/mAP"] == pytest.approx((m["voc/AP-aero"] + m["voc/AP-bike"]) / 2, abs=1e-12)
    assert 0.3 < m["voc/AP-aero"] < 1.0 and 0.3 < m["voc/AP-bike"] < 1.0


def test_hand_computed_voc07_aero():
    # aero: 3 non-difficult GT; ranking TP, FP, (ignored), TP, FP, TP
    # -> recall 1/3,1/3,2/3,2/3,1 ; precision 1,1/2,2/3,1/2,3/5
    # 11-point: t=0..0.3 -> 1 (4 pts), 0.4..0.6 -> 2/3 (3 pts), 0.7..1.0 -> 3/5 (4 pts)
    expected = (4 * 1 + 3 * (2 / 3) + 4 * 0.6) / 11
    m = run(VOCEvaluator(class_names=CLASSES, metric="voc07", legacy_coords=True))
    assert m["voc/AP-aero"] == pytest.approx(expected, abs=1e-12)


def test_class_with_gt_but_no_detections_is_zero():
    dets = [d for d in DETS if d[1] != 1]
    m = run(VOCEvaluator(class_names=CLASSES), dets=dets)
    assert m["voc/AP-bike"] == 0.0
    assert m["voc/mAP"] == pytest.approx(m["voc/AP-aero"] / 2)


def test_random_cases_equal_reference():
    rng = np.random.default_rng(0)
    gt, dets = {}, []
    for img in range(12):
        objs = []
        for _ in range(int(rng.integers(0, 5))):
            x, y = rng.uniform(0, 200, 2)
            box = [x, y, x + rng.uniform(10, 80), y + rng.uniform(10, 80)]
            objs.append((box, int(rng.integers(0, 3)), bool(rng.random() < 0.15)))
            for _ in range(int(rng.integers(0, 3))):
                jit = [v + rng.normal(0, 6) for v in box]
                dets.append((img, objs[-1][1] if rng.random() < 0.8 else int(rng.integers(0, 3)),
                             float(rng.random()), jit))
        gt[img] = objs
    for metric in ("voc07", "voc12"):
        m = run(VOCEvaluator(class_names=CLASSES, metric=metric, iou_thr=0.5, legacy_coords=True), gt, dets)
        for c, name in enumerate(CLASSES):
            ref = ref_voc_eval(gt, dets, c, use_07=metric == "voc07")
            assert m[f"voc/AP-{name}"] == pytest.approx(ref, abs=1e-12, nan_ok=True)


def test_voc_ap_known_values():
    assert voc_ap(np.array([0.5, 1.0]), np.array([1.0, 0.5]), "voc12") == pytest.approx(0.75)
    assert voc_ap(np.array([]), np.array([]), "voc07") == 0.0
    with pytest.raises(ValueError, match="voc07"):
        voc_ap(np.array([1.0]), np.array([1.0]), "voc10")


def test_gt_from_coco_gt_and_scaled_targets_agree():
    """GT from dataset.coco_gt() (difficult = iscrowd) == GT from targets mapped back by scale."""
    from pycocotools.coco import COCO

    anns, k = [], 0
    for img, objs in GT.items():
        for box, lab, diff in objs:
            k += 1
            anns.append({"id": k, "image_id": img, "category_id": [5, 9, 11][lab], "iscrowd": int(diff),
                         "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                         "area": float((box[2] - box[0]) * (box[3] - box[1]))})
    coco = COCO()
    coco.dataset = {"images": [{"id": i} for i in GT], "annotations": anns,
                    "categories": [{"id": c, "name": n} for c, n in zip([5, 9, 11], CLASSES)]}
    coco.createIndex()

    class FakeDataset:
        class_names = CLASSES
        label_to_cat_id = [5, 9, 11]

        def coco_gt(self):
            return coco

    from_coco = build_evaluator({"type": "VOCEvaluator", "metric": "voc12"}, FakeDataset())
    from_targets = VOCEvaluator(class_names=CLASSES, metric="voc12")
    expected = run(from_targets)
    from_coco.reset()
    for img in GT:  # targets of a pipeline that doubled the size: only image ids are read
        mine = [d for d in DETS if d[0] == img]
        pred = {"boxes": torch.tensor([d[3] for d in mine], dtype=torch.float32).reshape(-1, 4),
                "scores": torch.tensor([d[2] for d in mine]), "labels": torch.tensor([d[1] for d in mine])}
        from_coco.process([{"image_id": img, "boxes": torch.zeros(0, 4), "scale": torch.tensor([2.0, 2.0])}],
                          [pred])
    assert from_coco.evaluate() == pytest.approx(expected, nan_ok=True)
    # targets in a 2x resized image map back through scale
    scaled = VOCEvaluator(class_names=CLASSES, metric="voc12")
    for img, objs in GT.items():
        mine = [d for d in DETS if d[0] == img]
        scaled.process([{"image_id": img,
                         "boxes": 2 * torch.tensor([o[0] for o in objs], dtype=torch.float32),
                         "labels": torch.tensor([o[1] for o in objs]),
                         "difficult": torch.tensor([o[2] for o in objs]),
                         "scale": torch.tensor([2.0, 2.0]), "offset": torch.zeros(2)}],
                       [{"boxes": torch.tensor([d[3] for d in mine], dtype=torch.float32).reshape(-1, 4),
                         "scores": torch.tensor([d[2] for d in mine]),
                         "labels": torch.tensor([d[1] for d in mine])}])
    assert scaled.evaluate() == pytest.approx(expected, nan_ok=True)
    assert "mAP" in scaled.report()


def test_voc_dataset_ground_truth_equals_devkit_on_xml_coordinates(tmp_path):
    """VOCDetection stores XML boxes as pixel edges (xmin - 1, ymin - 1, xmax, ymax). Detections in
    edge coordinates scored with legacy_coords=False equal the devkit's +1 scoring of the raw XML
    coordinates and of the detections written 1-based (x1 + 1, y1 + 1, x2, y2)."""
    from detkit.data import VOCDetection

    (tmp_path / "Annotations").mkdir()
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "test.txt").write_text("\n".join(f"{i:06d}" for i in GT) + "\n")
    for img, objs in GT.items():
        xml = "".join(
            f"<object><name>{CLASSES[lab]}</name><difficult>{int(diff)}</difficult><bndbox>"
            f"<xmin>{b[0] + 1}</xmin><ymin>{b[1] + 1}</ymin><xmax>{b[2] + 1}</xmax><ymax>{b[3] + 1}</ymax>"
            f"</bndbox></object>"
            for b, lab, diff in objs)
        (tmp_path / "Annotations" / f"{img:06d}.xml").write_text(
            f"<annotation><size><width>300</width><height>300</height></size>{xml}</annotation>")
    dataset = VOCDetection(root=str(tmp_path), year=None, split="test", class_names=CLASSES)
    ev = build_evaluator({"type": "VOCEvaluator", "metric": "voc07"}, dataset)
    assert ev.coco_gt is not None and not ev.legacy_coords
    ev.reset()
    # XML = GT + 1 (1-based); devkit detections = DETS + 1; a devkit-style result (x1, y1, x2, y2)
    # is (x1 - 1, y1 - 1, x2, y2) in edge coordinates. Devkit IoU is translation invariant, so the
    # reference is ref_voc_eval(GT, DETS).
    for img in GT:
        mine = [d for d in DETS if d[0] == img]
        ev.process([{"image_id": img}], [{
            "boxes": torch.tensor([[b[0], b[1], b[2] + 1, b[3] + 1] for *_, b in mine]).reshape(-1, 4),
            "scores": torch.tensor([d[2] for d in mine]), "labels": torch.tensor([d[1] for d in mine])}])
    metrics = ev.evaluate()
    for c, name in enumerate(CLASSES[:2]):
        assert metrics[f"voc/AP-{name}"] == pytest.approx(ref_voc_eval(GT, DETS, c, use_07=True), abs=1e-12)


def test_string_image_ids_as_in_voc():
    # VOC image ids are file stems such as '2008_000123'; int() of them used to fail in process()
    names = {img: f"img_{chr(ord('a') + img)}" for img in GT}
    gt = {names[i]: objs for i, objs in GT.items()}
    dets = [(names[d[0]], *d[1:]) for d in DETS]
    by_name = run(VOCEvaluator(class_names=CLASSES, metric="voc07"), gt, dets)
    by_int = run(VOCEvaluator(class_names=CLASSES, metric="voc07"))
    assert by_name.keys() == by_int.keys()
    for key, value in by_int.items():
        assert by_name[key] == pytest.approx(value, abs=1e-12, nan_ok=True)
    tensor_ids = VOCEvaluator(class_names=CLASSES)
    tensor_ids.process([{"image_id": torch.tensor(7), "boxes": torch.zeros(0, 4),
                         "labels": torch.zeros(0, dtype=torch.int64)}],
                       [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                         "labels": torch.zeros(0, dtype=torch.int64)}])
    assert list(tensor_ids._images) == [7]
