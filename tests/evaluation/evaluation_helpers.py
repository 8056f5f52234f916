"""Shared fixtures of the evaluation tests (hand-made COCO / VOC / mask cases) and the DDP worker.

Kept in a plain module so that ``torch.multiprocessing.spawn`` children can import the worker.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.coco import COCO

from detkit.evaluation import COCOEvaluator, SegEvaluator, VOCEvaluator

K = 4
CLASSES = ["aero", "bike", "bird"]

LABEL_TO_CAT = [42, 3, 7]          # contiguous label -> sparse, unsorted category ids
NAMES = ["kite", "cat", "dog"]


def make_gt() -> dict:
    """5 images; small/medium/large boxes; a crowd region; image 5 gets no predictions."""
    rng = np.random.default_rng(0)
    images = [{"id": i, "width": 200, "height": 160, "file_name": f"{i}.png"} for i in range(1, 6)]
    anns = []
    for img in images:
        for _ in range(int(rng.integers(2, 6))):
            w, h = float(rng.choice([20, 50, 120])), float(rng.uniform(15, 100))
            x, y = float(rng.uniform(0, 200 - w)), float(rng.uniform(0, 160 - h))
            anns.append({"image_id": img["id"], "category_id": int(rng.choice(LABEL_TO_CAT)),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    anns.append({"image_id": 2, "category_id": 3, "bbox": [0.0, 0.0, 100.0, 80.0], "area": 8000.0,
                 "iscrowd": 1})
    for i, a in enumerate(anns):
        a["id"] = i + 1
    cats = [{"id": c, "name": n} for c, n in zip(LABEL_TO_CAT, NAMES)]
    return {"images": images, "annotations": anns, "categories": cats}


def make_coco(gt: dict) -> COCO:
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    coco.createIndex()
    return coco


def make_predictions(gt: dict, seed: int = 1) -> dict[int, dict]:
    """Jittered copies of GT boxes, false positives, wrong labels; xyxy tensors per image."""
    rng = np.random.default_rng(seed)
    cat_to_label = {c: i for i, c in enumerate(LABEL_TO_CAT)}
    preds = {}
    for img in gt["images"][:-1]:
        boxes, scores, labels = [], [], []
        for a in gt["annotations"]:
            if a["image_id"] != img["id"] or a["iscrowd"]:
                continue
            x, y, w, h = a["bbox"]
            for _ in range(int(rng.integers(1, 3))):
                j = rng.normal(0, 0.08, 4) * [w, h, w, h]
                boxes.append([x + j[0], y + j[1], x + w + j[2], y + h + j[3]])
                scores.append(float(rng.uniform(0.05, 1.0)))
                lab = cat_to_label[a["category_id"]]
                labels.append(lab if rng.random() > 0.15 else int(rng.integers(0, 3)))
        for _ in range(3):
            x, y = rng.uniform(0, 150), rng.uniform(0, 110)
            boxes.append([x, y, x + rng.uniform(5, 50), y + rng.uniform(5, 50)])
            scores.append(float(rng.uniform(0.0, 0.6)))
            labels.append(int(rng.integers(0, 3)))
        preds[img["id"]] = {"boxes": torch.tensor(boxes, dtype=torch.float32),
                            "scores": torch.tensor(scores, dtype=torch.float32),
                            "labels": torch.tensor(labels, dtype=torch.int64)}
    preds[gt["images"][-1]["id"]] = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                                     "labels": torch.zeros(0, dtype=torch.int64)}
    return preds


def direct_results(preds: dict[int, dict]) -> list[dict]:
    out = []
    for image_id, p in preds.items():
        for (x1, y1, x2, y2), s, lab in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
            out.append({"image_id": image_id, "category_id": LABEL_TO_CAT[lab],
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
    return out


GT = {
    1: [([10, 10, 50, 50], 0, False), ([60, 60, 100, 120], 0, True),     # a difficult aero
        ([5, 70, 40, 110], 1, False)],
    2: [([20, 20, 80, 70], 0, False), ([100, 10, 140, 60], 1, False), ([0, 0, 30, 30], 1, False)],
    3: [([30, 40, 90, 100], 0, False)],                                  # bird: no GT anywhere
}
DETS = [
    (1, 0, 0.95, [11, 9, 50, 52]),     # TP
    (1, 0, 0.90, [12, 11, 49, 50]),    # duplicate of the same GT -> FP
    (1, 0, 0.85, [61, 62, 101, 118]),  # hits the difficult box -> ignored
    (2, 0, 0.70, [22, 18, 78, 72]),    # TP
    (3, 0, 0.60, [200, 200, 220, 220]),  # miss -> FP
    (3, 0, 0.40, [31, 41, 88, 99]),    # TP, later in the ranking
    (1, 1, 0.80, [6, 71, 41, 109]),    # TP
    (2, 1, 0.75, [101, 12, 139, 58]),  # TP
    (2, 1, 0.65, [0, 0, 12, 12]),      # IoU < 0.5 with the small box -> FP
    (2, 1, 0.55, [101, 11, 140, 61]),  # duplicate -> FP
    (3, 2, 0.50, [1, 1, 9, 9]),        # bird detection without bird GT
]


def random_masks(n, seed, shape=(13, 17)):
    rng = np.random.default_rng(seed)
    gts = [rng.integers(0, K, shape) for _ in range(n)]
    for g in gts:
        g[rng.random(shape) < 0.2] = 255
    preds = [np.where(rng.random(shape) < 0.6, np.where(g == 255, 0, g), rng.integers(0, K, shape))
             for g in gts]
    return preds, gts


def build_inputs():
    gt = make_gt()
    coco_preds = make_predictions(gt)
    voc = []
    for img in sorted(GT):
        objs, mine = GT[img], [d for d in DETS if d[0] == img]
        voc.append(({"image_id": img, "boxes": torch.tensor([o[0] for o in objs], dtype=torch.float32),
                     "labels": torch.tensor([o[1] for o in objs]),
                     "difficult": torch.tensor([o[2] for o in objs])},
                    {"boxes": torch.tensor([d[3] for d in mine], dtype=torch.float32).reshape(-1, 4),
                     "scores": torch.tensor([d[2] for d in mine]),
                     "labels": torch.tensor([d[1] for d in mine])}))
    preds, gts = random_masks(5, 2)
    seg = [({"image_id": i, "sem_seg": torch.from_numpy(g)}, {"sem_seg": torch.from_numpy(p)})
           for i, (p, g) in enumerate(zip(preds, gts))]
    return gt, coco_preds, voc, seg


def evaluate_all(coco_items, voc_items, seg_items, gt):
    coco = COCOEvaluator(ann_file=make_coco(gt), label_to_cat_id=LABEL_TO_CAT)
    voc = VOCEvaluator(class_names=CLASSES, metric="voc12")
    seg = SegEvaluator(num_classes=K)
    out = {}
    for name, ev, items in (("coco", coco, coco_items), ("voc", voc, voc_items), ("seg", seg, seg_items)):
        ev.reset()
        for target, pred in items:
            ev.process([target], [pred])
        out[name] = ev.evaluate()
    return out


def shard(items, rank, world):
    padded = items + items[: (-len(items)) % world]  # DistributedSampler pads by repeating
    return padded[rank::world]


def worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gt, coco_preds, voc, seg = build_inputs()
        coco_items = [({"image_id": k}, v) for k, v in sorted(coco_preds.items())]
        result = evaluate_all(shard(coco_items, rank, world), shard(voc, rank, world),
                              shard(seg, rank, world), gt)
        with open(f"{out_dir}/rank{rank}.pkl", "wb") as f:
            pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


