"""The DETR heads' raw-output dict (RT-DETR / D-FINE SetCriterion names), the detkit -> DETR
target conversion and the NMS-free top-k prediction.

Legend: B images, Q matching queries, Nd denoising queries, C classes, K kept detections.
Inside the dict boxes are cxcywh normalised to the padded input (H_pad, W_pad).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ...errors import DetkitError
from ..matchers import ignore_flags
from .position import cxcywh_to_xyxy, xyxy_to_cxcywh

__all__ = ["assemble_outputs", "detr_targets_from_detkit", "topk_predictions", "SetPredictionMixin"]

_PER_QUERY_KEYS = ("pred_logits", "pred_boxes", "pred_corners", "ref_points")


def _split(layer: dict, num_dn: int) -> tuple[dict, dict]:
    """Split every per-query tensor of a layer dict along the query axis into (dn, matching)."""
    dn, match = {}, {}
    for key, value in layer.items():
        if key in _PER_QUERY_KEYS:
            dn[key], match[key] = value[:, :num_dn], value[:, num_dn:]
        else:
            dn[key] = match[key] = value
    return dn, match


def _with_teacher(layers: list[dict]) -> list[dict]:
    """D-FINE's GO-LSD: every layer dict also carries the last layer's corners and logits."""
    if not layers or "pred_corners" not in layers[-1]:
        return layers
    teacher = {"teacher_corners": layers[-1]["pred_corners"], "teacher_logits": layers[-1]["pred_logits"]}
    return [{**layer, **teacher} for layer in layers]


def assemble_outputs(layers: list[dict], encoder: dict, dn_meta: dict | None = None,
                     pre: dict | None = None) -> dict:
    """layers: per decoder layer ``{pred_logits Float[B,Nd+Q,C], pred_boxes Float[B,Nd+Q,4], ...}``;
    encoder: ``{pred_logits, pred_boxes}`` of the top-k proposals; pre: D-FINE's pre-bbox head.

    Returns the last layer's keys at the top level plus ``aux_outputs`` (layers 0..L-2),
    ``enc_aux_outputs``, and with denoising ``dn_outputs`` (all L layers), ``dn_meta``
    (and ``pre_outputs`` / ``dn_pre_outputs`` for D-FINE)."""
    num_dn = dn_meta["dn_num_split"][0] if dn_meta is not None else 0
    halves = [_split(layer, num_dn) for layer in layers]
    matching = [m for _, m in halves]
    out: dict = dict(matching[-1])
    out["aux_outputs"] = _with_teacher(matching)[:-1]
    out["enc_aux_outputs"] = [encoder]
    if pre is not None:
        pre_dn, out["pre_outputs"] = _split(pre, num_dn)
    if dn_meta is not None:
        out["dn_outputs"] = _with_teacher([d for d, _ in halves])
        out["dn_meta"] = dn_meta
        if pre is not None:
            out["dn_pre_outputs"] = pre_dn
    return out


def detr_targets_from_detkit(targets: Sequence[dict], padded_hw: Sequence[int]) -> list[dict]:
    """detkit targets (``boxes`` Float[N,4] xyxy pixels of the padded batch, ``labels`` Int64[N])
    -> ``[{labels Int64[M], boxes Float[M,4] cxcywh / (W_pad, H_pad)}]``; crowd / difficult boxes
    and boxes without area are dropped (detkit never trains on them)."""
    h, w = float(padded_hw[0]), float(padded_hw[1])
    converted = []
    for t in targets:
        boxes = t["boxes"].float().reshape(-1, 4)
        keep = ~ignore_flags(t) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        scale = boxes.new_tensor([w, h, w, h])
        converted.append({"labels": t["labels"].reshape(-1)[keep].long(),
                          "boxes": xyxy_to_cxcywh(boxes[keep]) / scale})
    return converted


def topk_predictions(logits: Tensor, boxes: Tensor, padded_hw: Sequence[int],
                     image_sizes: Sequence[Sequence[int]], num_top: int = 300) -> list[dict]:
    """logits Float[B,Q,C], boxes Float[B,Q,4] cxcywh normalised -> per image ``boxes`` Float[K,4]
    xyxy pixels (clipped to the unpadded size), ``scores`` Float[K], ``labels`` Int64[K];
    K = min(num_top, Q*C) best sigmoid scores over queries x classes (a query may give several)."""
    num_classes = logits.shape[-1]
    scores, index = logits.sigmoid().flatten(1).topk(min(num_top, logits.shape[1] * num_classes), dim=1)
    query = torch.div(index, num_classes, rounding_mode="floor")
    h, w = float(padded_hw[0]), float(padded_hw[1])
    picked = boxes.gather(1, query[..., None].expand(-1, -1, 4))
    xyxy = cxcywh_to_xyxy(picked) * boxes.new_tensor([w, h, w, h])
    results = []
    for b, (img_h, img_w) in enumerate(image_sizes):
        limit = xyxy.new_tensor([img_w, img_h, img_w, img_h])
        results.append({"boxes": torch.minimum(xyxy[b].clamp(min=0), limit), "scores": scores[b],
                        "labels": index[b] % num_classes})
    return results


class SetPredictionMixin:
    """``loss`` and ``predict`` of a DETR head whose ``forward`` returns the raw-output dict above
    (with ``image_size`` = the padded input (H_pad, W_pad)); the head sets ``criterion`` (None:
    inference only) and ``num_top_queries``."""

    criterion: torch.nn.Module | None
    num_top_queries: int

    def loss(self, outputs: dict, targets: list[dict],
             image_sizes: Sequence[Sequence[int]]) -> dict[str, Tensor]:
        """detkit targets (xyxy pixels of the padded batch) -> DETR format -> ``criterion``."""
        if self.criterion is None:
            raise DetkitError(f"{type(self).__name__}.loss: the head was built without a criterion "
                              "(pass criterion=... to train it)")
        return self.criterion(outputs, detr_targets_from_detkit(targets, outputs["image_size"]))

    def predict(self, outputs: dict, image_sizes: Sequence[Sequence[int]]) -> list[dict]:
        """Top-k of sigmoid scores over queries x classes; ``boxes`` xyxy pixels clipped per image."""
        return topk_predictions(outputs["pred_logits"], outputs["pred_boxes"], outputs["image_size"],
                                image_sizes, self.num_top_queries)
