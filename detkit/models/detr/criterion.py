"""SetCriterion: the losses of RT-DETR (v1, v2), D-FINE and DEIM, in DETR's style: match each
output set once, then one small function per loss term (:mod:`detkit.models.detr.losses`).

Legend: B images, Q queries, C classes, N targets of an image, R = reg_max. Boxes are cxcywh
normalised to the padded input. Inputs are the DETR heads' raw-output dict and DETR-format
targets ``[{labels Int64[N], boxes Float[N,4]}] * B`` (see ``detr/outputs.py``).

Output sets and their key suffixes: the last decoder layer (no suffix), ``aux_outputs[i]``
(``_aux_i``), ``pre_outputs`` (``_pre``, D-FINE's pre-bbox head), ``enc_aux_outputs[i]``
(``_enc_i``), and with denoising ``dn_outputs[i]`` (``_dn_i``) and ``dn_pre_outputs``
(``_dn_pre``). A denoising query's target is known by construction (``dn_meta``: group g's
positive query of target n is ``dn_positive_idx[b][g * N + n]``), so denoising is not matched
and its terms are divided by ``num_boxes * dn_num_group``.

Terms: the class loss (``loss_vfl``, ``loss_focal``, DEIM's ``loss_mal`` or LW-DETR's
``loss_iabce``), ``loss_bbox`` (L1), ``loss_giou``, and on sets with ``pred_corners`` (D-FINE)
``loss_fgl`` and, on sets with ``teacher_corners``, ``loss_ddf``. The detkit trainer sums every
``loss_*`` key, so by default the per-layer keys are summed per term and per kind of set
(``loss_vfl``, ``loss_vfl_aux``, ``loss_vfl_enc``, ``loss_vfl_pre``, ``loss_vfl_dn``,
``loss_vfl_dn_pre``: at most 30 keys for D-FINE instead of ~70); ``per_layer_keys=True`` keeps one
key per layer, as the original code and transformers name them. The total is the same.

``union_matching`` is D-FINE's / DEIM's "GO" matching (transformers' ``use_dense_one_to_one``):
the box and FGL/DDF terms of every decoder layer, the pre-bbox head and the encoder use the union
of all those sets' matches (for each query the target it is matched to most often), the class
loss keeps each set's own matching. DEIM's Dense O2O itself is data: more targets per image from
mosaic (``detkit/data/mosaic.py``, the ``Mosaic`` dataset wrapper) and mixup
(``detkit/data/mixup.py``, ``MixUp``, with DEIM's epoch window ``from_epoch`` / ``until_epoch``),
then the same one-to-one matching; nothing else in the loss changes (the matcher takes any N,
also N > Q).

Where the references differ (tested against transformers' RTDetrLoss, DFineLoss, Deimv2Loss):
the last layer's FGL is computed (the original D-FINE does; transformers leaves it out); the
pre-bbox head sets are supervised (original D-FINE; transformers has no ``pre_outputs``) and take
part in the union; the denoising DDF mixes its matched / unmatched means by its own counts
(transformers; the original reuses the matching queries' counts). Not supported: RT-DETRv2's
class-agnostic encoder loss (off in every published config).
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..matchers import HungarianMatcher
from .fdr import weighting_function
from .losses import (
    box_losses,
    decoupled_distillation_loss,
    edge_bin_targets,
    fine_grained_localization_loss,
    focal_loss,
    iou_aware_bce_loss,
    matchability_aware_loss,
    paired_iou,
    varifocal_loss,
)

__all__ = ["SetCriterion"]

Matches = list[tuple[Tensor, Tensor]]
CLASS_LOSSES = ("vfl", "focal", "mal", "iabce")
DEFAULT_WEIGHTS = {"class": 1.0, "bbox": 5.0, "giou": 2.0, "fgl": 0.15, "ddf": 1.5}


def average_count(count: float, device: torch.device) -> float:
    """A per-rank count averaged over the DDP ranks (when torch.distributed is initialised), >= 1."""
    value = torch.tensor([float(count)], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return float(value.clamp(min=1).item())


def union_of_matches(match_sets: Sequence[Matches]) -> Matches:
    """Per image, every query matched in any set paired with the target it is matched to most often
    (ties: the lowest target index). Returns (pred_idx ascending, tgt_idx) Int64 per image."""
    union = []
    for per_image in zip(*match_sets):
        pairs = torch.cat([torch.stack([q, t], 1) for q, t in per_image])
        if pairs.shape[0] == 0:
            union.append((pairs[:, 0], pairs[:, 1]))
            continue
        unique, counts = torch.unique(pairs, dim=0, return_counts=True)   # sorted by (query, target)
        order = torch.argsort(-counts, stable=True)
        best: dict[int, int] = {}
        for query, target in unique[order].tolist():
            best.setdefault(query, target)
        queries = sorted(best)
        union.append((pairs.new_tensor(queries), pairs.new_tensor([best[q] for q in queries])))
    return union


def denoising_matches(dn_meta: dict, targets: Sequence[dict]) -> Matches:
    """The fixed (query, target) pairs of the denoising queries: ``dn_positive_idx`` per image
    against targets 0..N-1 repeated once per group."""
    matches = []
    for positive, target in zip(dn_meta["dn_positive_idx"], targets):
        num = target["labels"].shape[0]
        target_idx = torch.arange(num, device=target["labels"].device).repeat(int(dn_meta["dn_num_group"]))
        positive = torch.as_tensor(positive, dtype=torch.int64, device=target["labels"].device).reshape(-1)
        if positive.numel() != target_idx.numel():
            raise ValueError(f"dn_meta: {positive.numel()} positive denoising queries for {num} targets "
                             f"x {dn_meta['dn_num_group']} groups")
        matches.append((positive, target_idx))
    return matches


def key_group(suffix: str) -> str:
    """``_aux_3`` -> ``_aux``, ``_dn_0`` -> ``_dn``; other suffixes stay."""
    return re.sub(r"_\d+$", "", suffix)


class SetCriterion(nn.Module):
    """The RT-DETR / D-FINE / DEIM set losses (see the module docstring).

    Args:
        num_classes: C.
        class_loss: ``vfl`` (RT-DETR, D-FINE), ``focal``, ``mal`` (DEIM; use ``gamma=1.5``) or
            ``iabce`` (LW-DETR / RF-DETR's IoU-aware BCE; use ``alpha=0.25``). An output dict with
            ``num_groups`` G > 1 (Group DETR) is matched per group of Q/G queries and its terms are
            divided by G times the target count.
        alpha / gamma: the class loss's parameters (varifocal: 0.75, 2.0; focal: set 0.25).
        mal_alpha: MAL's negative weight (None: 1, DEIM's default).
        weights: per-term weights, keys ``class`` (the class loss; or its name ``vfl`` / ``focal`` /
            ``mal``), ``bbox``, ``giou``, ``fgl``, ``ddf``; missing keys keep RT-DETR / D-FINE's
            1, 5, 2, 0.15, 1.5.
        matcher: :class:`HungarianMatcher` keyword arguments (default: costs 2 / 5 / 2,
            focal cost with alpha 0.25, gamma 2).
        union_matching: D-FINE's / DEIM's union ("GO") matching for the box and local terms
            (the original D-FINE and DEIM set it; transformers' D-FINE loss does not).
        reg_scale / up: D-FINE's weighting-function constants, used when an output set does not
            carry its own ``reg_scale`` / ``up`` tensors.
        ddf_temperature: DDF's distillation temperature T (5).
        per_layer_keys: one key per layer instead of per kind of set.
        clamp_boxes: clamp predicted boxes to [0, 1] before matching and losses (as transformers
            does for D-FINE, whose FDR boxes may leave the image; a no-op for sigmoid boxes).
    """

    def __init__(self, *, num_classes: int, class_loss: str = "vfl", alpha: float = 0.75,
                 gamma: float = 2.0, mal_alpha: float | None = None, weights: dict | None = None,
                 matcher: dict | None = None, union_matching: bool = False, reg_scale: float = 4.0,
                 up: float = 0.5, ddf_temperature: float = 5.0, per_layer_keys: bool = False,
                 clamp_boxes: bool = True):
        super().__init__()
        if class_loss not in CLASS_LOSSES:
            raise ValueError(f"class_loss must be one of {', '.join(CLASS_LOSSES)}, got {class_loss!r}")
        # the class term may also be named after its key (``vfl: 1.0`` for ``loss_vfl``)
        weights = {("class" if k in CLASS_LOSSES else k): v for k, v in (weights or {}).items()}
        unknown = sorted(set(weights) - set(DEFAULT_WEIGHTS))
        if unknown:
            raise ValueError(f"weights: unknown term(s) {unknown}; terms: {', '.join(DEFAULT_WEIGHTS)}")
        self.num_classes = int(num_classes)
        self.class_loss = class_loss
        self.alpha, self.gamma, self.mal_alpha = float(alpha), float(gamma), mal_alpha
        self.weights = {**DEFAULT_WEIGHTS, **{k: float(v) for k, v in weights.items()}}
        self.matcher = HungarianMatcher(**(matcher or {}))
        self.union_matching = bool(union_matching)
        self.reg_scale, self.up = float(reg_scale), float(up)
        self.ddf_temperature = float(ddf_temperature)
        self.per_layer_keys = bool(per_layer_keys)
        self.clamp_boxes = bool(clamp_boxes)
        self.num_groups = 1   # set per call from the outputs' ``num_groups``

    def forward(self, outputs: dict, targets: Sequence[dict]) -> dict[str, Tensor]:
        """outputs: the raw-output dict; targets: DETR-format targets -> weighted ``loss_*`` terms."""
        device = outputs["pred_logits"].device
        # Group DETR (LW-DETR): G query groups, each matched on its own; counts G times the targets
        self.num_groups = int(outputs.get("num_groups", 1))
        num_boxes = average_count(sum(t["labels"].shape[0] for t in targets) * self.num_groups, device)
        matched_sets = [("", outputs)]
        matched_sets += [(f"_aux_{i}", o) for i, o in enumerate(outputs.get("aux_outputs", []))]
        if outputs.get("pre_outputs") is not None:
            matched_sets.append(("_pre", outputs["pre_outputs"]))
        matched_sets += [(f"_enc_{i}", o) for i, o in enumerate(outputs.get("enc_aux_outputs", []))]
        own = {suffix: self.match(layer, targets) for suffix, layer in matched_sets}
        box_matches, box_num = own, {suffix: num_boxes for suffix in own}
        if self.union_matching:
            union = union_of_matches(list(own.values()))
            union_num = average_count(sum(q.numel() for q, _ in union), device)
            box_matches = {suffix: union for suffix in own}
            box_num = {suffix: union_num for suffix in own}

        losses: dict[str, Tensor] = {}
        for suffix, layer in matched_sets:
            self._add(losses, suffix, self.class_term(layer, targets, own[suffix], num_boxes))
            self._add(losses, suffix, self.box_terms(layer, targets, box_matches[suffix], box_num[suffix],
                                                     outputs))
        if outputs.get("dn_outputs"):
            dn_matches = denoising_matches(outputs["dn_meta"], targets)
            dn_num = num_boxes * int(outputs["dn_meta"]["dn_num_group"])
            dn_sets = [(f"_dn_{i}", o) for i, o in enumerate(outputs["dn_outputs"])]
            if outputs.get("dn_pre_outputs") is not None:
                dn_sets.append(("_dn_pre", outputs["dn_pre_outputs"]))
            for suffix, layer in dn_sets:
                self._add(losses, suffix, self.class_term(layer, targets, dn_matches, dn_num))
                self._add(losses, suffix, self.box_terms(layer, targets, dn_matches, dn_num, outputs))
        return losses

    def _add(self, losses: dict[str, Tensor], suffix: str, terms: dict[str, Tensor]) -> None:
        """Weight the terms and store them under ``loss_<term><suffix>`` (or its group's key)."""
        for term, value in terms.items():
            weight = self.weights["class" if term in CLASS_LOSSES else term]
            key = f"loss_{term}{suffix if self.per_layer_keys else key_group(suffix)}"
            losses[key] = losses[key] + weight * value if key in losses else weight * value

    def _boxes(self, layer: dict) -> Tensor:
        return layer["pred_boxes"].clamp(0, 1) if self.clamp_boxes else layer["pred_boxes"]

    def match(self, layer: dict, targets: Sequence[dict]) -> Matches:
        groups = getattr(self, "num_groups", 1)
        if groups == 1:
            return self.matcher(layer["pred_logits"], self._boxes(layer), targets)
        size = layer["pred_logits"].shape[1] // groups
        per_group = [self.matcher(layer["pred_logits"][:, g * size:(g + 1) * size],
                                  self._boxes(layer)[:, g * size:(g + 1) * size], targets)
                     for g in range(groups)]
        return [(torch.cat([m[b][0] + g * size for g, m in enumerate(per_group)]),
                 torch.cat([m[b][1] for m in per_group])) for b in range(len(targets))]

    def _matched_pairs(self, layer: dict, targets: Sequence[dict],
                       matches: Matches) -> tuple[tuple[Tensor, Tensor], Tensor, Tensor, Tensor]:
        """((batch_idx, query_idx) Int64[M], boxes Float[M,4], target boxes Float[M,4], labels Int64[M])."""
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(matches)])
        query_idx = torch.cat([q for q, _ in matches])
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, matches)])
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, matches)])
        boxes = self._boxes(layer)[batch_idx, query_idx]
        return (batch_idx, query_idx), boxes, target_boxes.to(boxes.dtype), labels

    def class_term(self, layer: dict, targets: Sequence[dict], matches: Matches,
                   num_boxes: float) -> dict[str, Tensor]:
        """The class loss of one output set under its matches."""
        where, boxes, target_boxes, labels = self._matched_pairs(layer, targets, matches)
        logits = layer["pred_logits"]
        if self.class_loss == "focal":
            return {"focal": focal_loss(logits, where, labels, num_boxes, alpha=self.alpha, gamma=self.gamma)}
        ious = paired_iou(boxes.detach(), target_boxes)
        if self.class_loss == "iabce":
            return {"iabce": iou_aware_bce_loss(logits, where, labels, ious, num_boxes, alpha=self.alpha,
                                                gamma=self.gamma)}
        if self.class_loss == "mal":
            return {"mal": matchability_aware_loss(logits, where, labels, ious, num_boxes, gamma=self.gamma,
                                                   alpha=self.mal_alpha)}
        return {"vfl": varifocal_loss(logits, where, labels, ious, num_boxes, alpha=self.alpha,
                                      gamma=self.gamma)}

    def box_terms(self, layer: dict, targets: Sequence[dict], matches: Matches, num_boxes: float,
                  outputs: dict) -> dict[str, Tensor]:
        """L1 and GIoU, plus FGL / DDF where the set has edge distributions (D-FINE)."""
        where, boxes, target_boxes, _ = self._matched_pairs(layer, targets, matches)
        l1, giou = box_losses(boxes, target_boxes, num_boxes)
        terms = {"bbox": l1, "giou": giou}
        if layer.get("pred_corners") is not None:
            terms.update(self.local_terms(layer, where, boxes, target_boxes, num_boxes, outputs))
        return terms

    def _constant(self, name: str, layer: dict, outputs: dict, device: torch.device) -> Tensor:
        """``up`` / ``reg_scale`` Float[1]: the set's own, else the top level's, else the constructor's."""
        value = layer.get(name, outputs.get(name))
        if value is None:
            value = getattr(self, name)
        return torch.as_tensor(value, dtype=torch.float32, device=device).reshape(1).detach()

    def local_terms(self, layer: dict, where: tuple[Tensor, Tensor], boxes: Tensor, target_boxes: Tensor,
                    num_boxes: float, outputs: dict) -> dict[str, Tensor]:
        """D-FINE's FGL (and DDF when the set carries ``teacher_corners``)."""
        corners = layer["pred_corners"]
        bins = corners.shape[-1] // 4
        reg_scale = self._constant("reg_scale", layer, outputs, corners.device)
        up = self._constant("up", layer, outputs, corners.device)
        project = weighting_function(bins - 1, up, reg_scale)
        ious = paired_iou(boxes, target_boxes).detach()
        left_bin, weight_right = edge_bin_targets(layer["ref_points"][where].detach(), target_boxes,
                                                  project, reg_scale)
        terms = {"fgl": fine_grained_localization_loss(corners[where].reshape(-1, bins), left_bin,
                                                       weight_right, ious.repeat_interleave(4), num_boxes)}
        if layer.get("teacher_corners") is not None:
            terms["ddf"] = decoupled_distillation_loss(corners, layer["teacher_corners"],
                                                       layer["teacher_logits"], where, ious,
                                                       temperature=self.ddf_temperature)
        return terms
