"""Image-pyramid methods for every detector: batch multi-scale training and test-time augmentation.

Legend: K boxes, T augmented views of one image.

* ``multiscale_train``: each training iteration draws one short-edge size from a list and resizes
  the whole batch (images and boxes) to it before the model sees it, the "random input size per
  batch" of YOLOv2/v3. (Per-*image* random sizes are the data pipeline's ``ResizeShortestEdge``
  with a list of sizes.)
* ``test_time_aug``: the model runs on several scales (factors of the pipeline's output size) and,
  optionally, on the horizontal mirror of each; predictions are mapped back to the un-augmented
  image and merged per class by NMS or by weighted boxes fusion (Solovyev et al., 2021).

Both are keys of a detector config (``model.multiscale_train`` / ``model.test_time_aug``), handled
by the ``Detector`` base class, so every detector gets them.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms, box_iou

__all__ = ["MultiScaleTrain", "TestTimeAug", "wbf_clusters", "weighted_boxes_fusion", "merge_detections",
           "flip_boxes"]


def flip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Mirror Float[K,4] xyxy boxes horizontally inside an image of ``width`` pixels."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def _resize(image: Tensor, factor: float) -> Tensor:
    if factor == 1.0:
        return image
    h, w = image.shape[-2:]
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]


class MultiScaleTrain:
    """Resize each training batch to a random short edge from ``short_edges`` (long edge capped).

    The sizes come from a private ``random.Random``: the trainer seeds it with ``seed`` (default:
    ``train.seed``) plus the process rank (:meth:`seed_for_rank`) and saves its state with the
    other RNG states in checkpoints (:meth:`state_dict`), so ``--deterministic`` runs repeat and
    ``--resume`` continues the same size sequence.
    """

    def __init__(self, *, short_edges: Sequence[int], max_size: int | None = None, seed: int | None = None):
        if not short_edges:
            raise ValueError("multiscale_train.short_edges must list at least one size")
        self.short_edges = [int(s) for s in short_edges]
        self.max_size = max_size
        self.seed = seed
        self.rng = random.Random(seed)

    def seed_for_rank(self, default_seed: int, rank: int) -> None:
        """Seed with ``seed`` (or ``default_seed`` when none was configured) + ``rank``."""
        self.rng.seed((default_seed if self.seed is None else self.seed) + rank)

    def state_dict(self) -> dict:
        """The size generator's state (ints and tuples: loadable with ``weights_only``)."""
        version, internal, gauss = self.rng.getstate()
        return {"version": version, "internal": list(internal), "gauss": gauss}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate((state["version"], tuple(state["internal"]), state["gauss"]))

    def __call__(self, images: list[Tensor], targets: list[dict]) -> tuple[list[Tensor], list[dict]]:
        short = self.rng.choice(self.short_edges)
        out_images, out_targets = [], []
        for image, target in zip(images, targets):
            h, w = image.shape[-2:]
            factor = short / min(h, w)
            if self.max_size is not None:
                factor = min(factor, self.max_size / max(h, w))
            resized = _resize(image, factor)
            sy, sx = resized.shape[-2] / h, resized.shape[-1] / w
            scale_xyxy = torch.tensor([sx, sy, sx, sy], device=target["boxes"].device)
            target = dict(target, boxes=target["boxes"] * scale_xyxy)
            if "scale" in target:
                target["scale"] = target["scale"] * torch.tensor([sx, sy], device=target["scale"].device)
                target["offset"] = target.get("offset", torch.zeros(2)) * torch.tensor([sx, sy])
            if "sem_seg" in target:
                target["sem_seg"] = F.interpolate(target["sem_seg"][None, None].float(),
                                                  size=resized.shape[-2:], mode="nearest")[0, 0].long()
            if "masks" in target:   # instance masks, Bool[N,H,W]
                target["masks"] = F.interpolate(target["masks"][None].float(), size=resized.shape[-2:],
                                                mode="nearest")[0] > 0.5
            out_images.append(resized)
            out_targets.append(target)
        return out_images, out_targets


def wbf_clusters(boxes: Tensor, scores: Tensor, labels: Tensor, *, iou_thr: float
                 ) -> tuple[Tensor, Tensor, list[list[int]]]:
    """The clustering of :func:`weighted_boxes_fusion`: fused boxes Float[C,4] xyxy, cluster
    labels Int64[C] and each cluster's member indices into the inputs, highest score first.

    Boxes are visited by descending score; each joins the first cluster of its class whose fused
    box overlaps it by more than ``iou_thr``, else starts a cluster. A cluster's box is the
    score-weighted mean of its members.
    """
    # One IoU row against all clusters per box (not a Python loop over clusters): sliced inference
    # merges thousands of boxes. argmax returns the first maximum, the loop's tie-break.
    fused = boxes.new_zeros(len(boxes), 4)             # rows [:len(members)] are the clusters
    cluster_labels = labels.new_zeros(len(boxes))
    members: list[list[int]] = []
    for idx in torch.argsort(scores, descending=True).tolist():
        n, best = len(members), -1
        if n:
            ious = box_iou(boxes[idx][None], fused[:n])[0]
            ious[cluster_labels[:n] != labels[idx]] = -1.0
            top = int(torch.argmax(ious))
            best = top if float(ious[top]) > iou_thr else -1
        if best < 0:
            fused[n], cluster_labels[n] = boxes[idx], labels[idx]
            members.append([idx])
        else:
            members[best].append(idx)
            w = scores[members[best]]
            fused[best] = (boxes[members[best]] * w[:, None]).sum(0) / w.sum()
    return fused[:len(members)], cluster_labels[:len(members)], members


def weighted_boxes_fusion(boxes: Tensor, scores: Tensor, labels: Tensor, *, iou_thr: float,
                          num_views: int) -> tuple[Tensor, Tensor, Tensor]:
    """Fuse overlapping same-class boxes from ``num_views`` predictions into score-weighted means.

    Clusters as :func:`wbf_clusters`; a cluster's score is its members' mean score times
    ``min(members, num_views) / num_views``, so a box that only one view found is down-weighted.
    """
    fused, cluster_labels, members = wbf_clusters(boxes, scores, labels, iou_thr=iou_thr)
    if not members:
        return boxes.new_zeros(0, 4), scores.new_zeros(0), labels.new_zeros(0)
    out_scores = torch.stack([scores[m].mean() * min(len(m), num_views) / num_views for m in members])
    return fused, out_scores, cluster_labels


class TestTimeAug:
    """Run ``predict_fn`` on scaled / flipped views of each image and merge the predictions."""

    __test__ = False  # not a pytest class

    def __init__(self, *, scales: Sequence[float] = (1.0,), flip: bool = False, merge: str = "nms",
                 iou_thr: float = 0.55, max_detections: int = 100):
        if merge not in ("nms", "wbf"):
            raise ValueError(f"test_time_aug.merge must be 'nms' or 'wbf', got '{merge}'")
        self.scales = [float(s) for s in scales]
        self.flip = bool(flip)
        self.merge = merge
        self.iou_thr = iou_thr
        self.max_detections = max_detections

    def views(self) -> list[tuple[float, bool]]:
        return [(s, f) for s in self.scales for f in ((False, True) if self.flip else (False,))]

    def __call__(self, predict_fn, images: list[Tensor]) -> list[dict]:
        """``predict_fn(list[Tensor]) -> list[dict]`` with boxes in the pixels of the images given."""
        views = self.views()
        per_view = []
        for factor, flipped in views:
            batch = [_resize(im, factor) for im in images]
            if flipped:
                batch = [im.flip(-1) for im in batch]
            preds = predict_fn(batch)
            if flipped:
                preds = [dict(p, boxes=flip_boxes(p["boxes"], im.shape[-1])) for p, im in zip(preds, batch)]
            per_view.append([self._unscale(p, im_scaled, im_orig)
                             for p, im_scaled, im_orig in zip(preds, batch, images)])
        if len(views) == 1:
            return per_view[0]
        return [self._merge([v[i] for v in per_view], len(views)) for i in range(len(images))]

    @staticmethod
    def _unscale(pred: dict, scaled: Tensor, original: Tensor) -> dict:
        sy = scaled.shape[-2] / original.shape[-2]
        sx = scaled.shape[-1] / original.shape[-1]
        if sx == 1.0 and sy == 1.0:
            return pred
        div = torch.tensor([sx, sy, sx, sy], device=pred["boxes"].device, dtype=pred["boxes"].dtype)
        return dict(pred, boxes=pred["boxes"] / div)

    def _merge(self, preds: list[dict], num_views: int) -> dict:
        boxes, scores, labels = merge_detections(
            torch.cat([p["boxes"] for p in preds]), torch.cat([p["scores"] for p in preds]),
            torch.cat([p["labels"] for p in preds]), merge=self.merge, iou_thr=self.iou_thr,
            num_views=num_views, max_detections=self.max_detections)
        return {"boxes": boxes, "scores": scores, "labels": labels}


def merge_detections(boxes: Tensor, scores: Tensor, labels: Tensor, *, merge: str, iou_thr: float,
                     num_views: int = 1, max_detections: int | None = None
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Class-wise merge of pooled Float[K,4] xyxy predictions from several views (TTA scales,
    slicing tiles): ``merge="nms"`` keeps the best of overlapping boxes, ``"wbf"`` fuses them
    (:func:`weighted_boxes_fusion`); returns boxes, scores, labels, best first, at most
    ``max_detections`` (None: all)."""
    if merge == "wbf":
        boxes, scores, labels = weighted_boxes_fusion(boxes, scores, labels, iou_thr=iou_thr,
                                                      num_views=num_views)
        keep = torch.argsort(scores, descending=True)
    elif merge == "nms":
        keep = batched_nms(boxes, scores, labels, iou_thr)
    else:
        raise ValueError(f"merge must be 'nms' or 'wbf', got '{merge}'")
    keep = keep[:max_detections]
    return boxes[keep], scores[keep], labels[keep]
