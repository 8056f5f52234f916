"""Convert torchvision detection checkpoints to detkit state dicts.

Supported: ``fasterrcnn_resnet50_fpn`` (v1) -> ``TwoStageDetector`` with ``ResNet(depth=50)``,
``FPN(extra_levels=maxpool)``, ``RPNHead`` and ``RoIHead(box_head=TwoMLPHead)``
(configs/faster_rcnn/faster_rcnn_r50_fpn_coco.yaml); ``maskrcnn_resnet50_fpn`` (v1) -> the same
plus ``MaskRoIHead`` (configs/mask_rcnn/mask_rcnn_r50_fpn_coco.yaml).

Key mapping::

    backbone.body.X                            -> backbone.X           (torchvision ResNet names)
    backbone.fpn.inner_blocks.i[.0].*          -> neck.lateral_convs.i.*
    backbone.fpn.layer_blocks.i[.0].*          -> neck.output_convs.i.*
    rpn.head.conv[.i.0].*                      -> rpn.conv.i.*
    rpn.head.cls_logits.* / rpn.head.bbox_pred.* -> rpn.objectness.* / rpn.deltas.*
    roi_heads.box_head.fc6|fc7.*               -> roi_head.box_head.fc6|fc7.*
    roi_heads.box_predictor.cls_score.*        -> roi_head.cls_score.*  (rows: classes, then background)
    roi_heads.box_predictor.bbox_pred.*        -> roi_head.bbox_pred.*  (background rows dropped)
    roi_heads.mask_head.i.0.* (mask_fcn{i+1}.*) -> mask_head.convs.i.*
    roi_heads.mask_predictor.conv5_mask.*      -> mask_head.deconv.*
    roi_heads.mask_predictor.mask_fcn_logits.* -> mask_head.logits.*   (background row dropped)

torchvision's class 0 is background and foreground classes are 1..K; detkit's foreground
labels are 0..C-1 with background last. ``class_ids`` picks which torchvision classes become
detkit labels 0..C-1 (default: all 1..K). torchvision's COCO models have K = 90 (COCO category
ids, ten of them unused); for an 80-class detkit model the 80 real COCO ids are used, which is
the order of detkit's COCO dataset labels (sorted category ids).

torchvision places the anchors of a level at multiples of ``padded_size // grid_size``, which is
not the level's stride when the grid was rounded up (P6 of a 512 x 800 batch: 800 // 13 = 61).
Converted weights were trained with those anchors, so loading them switches every
``AnchorGenerator`` of the model to ``stride_mode="torchvision"`` (:func:`use_torchvision_anchors`);
checkpoints written by ``tools/convert_weights.py`` record ``anchor_stride_mode`` in their meta.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..anchors import AnchorGenerator
from ..utils import load_state_dict_checked

__all__ = ["torchvision_to_detkit", "load_torchvision_weights", "use_torchvision_anchors",
           "apply_converted_meta", "COCO_CATEGORY_IDS", "SUPPORTED_ARCHS"]

SUPPORTED_ARCHS = ("fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn")
_MASK_LOGITS = "roi_heads.mask_predictor.mask_fcn_logits"
_UNUSED_COCO_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in _UNUSED_COCO_IDS]

_RENAMES = [  # (regex on the torchvision key, replacement); first match wins
    (r"^backbone\.body\.", "backbone."),
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?", r"neck.lateral_convs.\1."),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?", r"neck.output_convs.\1."),
    (r"^rpn\.head\.conv\.(\d+)\.0\.", r"rpn.conv.\1."),
    (r"^rpn\.head\.conv\.(weight|bias)$", r"rpn.conv.0.\1"),  # torchvision < 0.13 layout
    (r"^rpn\.head\.cls_logits\.", "rpn.objectness."),
    (r"^rpn\.head\.bbox_pred\.", "rpn.deltas."),
    (r"^roi_heads\.box_head\.(fc6|fc7)\.", r"roi_head.box_head.\1."),
    (r"^roi_heads\.mask_head\.(\d+)\.0\.", r"mask_head.convs.\1."),
    (r"^roi_heads\.mask_predictor\.conv5_mask\.", "mask_head.deconv."),
]
_MASK_ARCH_ONLY = ("roi_heads.mask_head.", "roi_heads.mask_predictor.")
_LEGACY_MASK_FCN = re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.")  # torchvision < 0.13 names


def _rename(key: str, arch: str) -> str | None:
    if key.startswith(_MASK_ARCH_ONLY) and not arch.startswith("maskrcnn"):
        return None
    legacy = _LEGACY_MASK_FCN.match(key)
    if legacy:
        return f"mask_head.convs.{int(legacy.group(1)) - 1}.{key[legacy.end():]}"
    for pattern, replacement in _RENAMES:
        if re.search(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def _predictor(state: Mapping[str, Tensor], class_ids: Sequence[int]) -> dict[str, Tensor]:
    """Reorder the class rows of the box predictor (see the module docstring)."""
    out = {}
    keep = torch.as_tensor(list(class_ids), dtype=torch.int64)
    cls_rows = torch.cat([keep, torch.zeros(1, dtype=torch.int64)])  # background goes last
    box_rows = (keep[:, None] * 4 + torch.arange(4)).reshape(-1)
    for name in ("weight", "bias"):
        out[f"roi_head.cls_score.{name}"] = state[f"roi_heads.box_predictor.cls_score.{name}"][cls_rows]
        out[f"roi_head.bbox_pred.{name}"] = state[f"roi_heads.box_predictor.bbox_pred.{name}"][box_rows]
        if f"{_MASK_LOGITS}.{name}" in state:   # one mask channel per class, background dropped
            out[f"mask_head.logits.{name}"] = state[f"{_MASK_LOGITS}.{name}"][keep]
    return out


def torchvision_to_detkit(state_dict: Mapping[str, Tensor], arch: str = "fasterrcnn_resnet50_fpn",
                          class_ids: Sequence[int] | None = None) -> dict[str, Tensor]:
    """A torchvision ``arch`` state dict -> a detkit ``TwoStageDetector`` state dict.

    ``class_ids``: torchvision class indices (1..K) that become detkit labels 0..C-1, in order;
    default all of 1..K. Raises ValueError for an unsupported ``arch`` or unknown keys.
    """
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"unsupported arch '{arch}'; supported: {', '.join(SUPPORTED_ARCHS)}")
    state = dict(state_dict)
    for key in ("model", "state_dict"):  # training checkpoints wrap the weights
        if isinstance(state.get(key), Mapping):
            state = dict(state[key])
    if "roi_heads.box_predictor.cls_score.weight" not in state:
        raise ValueError(f"not a torchvision {arch} state dict (no roi_heads.box_predictor.cls_score)")
    if arch.startswith("maskrcnn") and f"{_MASK_LOGITS}.weight" not in state:
        raise ValueError(f"not a torchvision {arch} state dict (no {_MASK_LOGITS}): a Faster R-CNN "
                         f"checkpoint? use arch fasterrcnn_resnet50_fpn")
    num_tv_classes = state["roi_heads.box_predictor.cls_score.weight"].shape[0] - 1
    class_ids = list(range(1, num_tv_classes + 1)) if class_ids is None else list(class_ids)
    bad = [c for c in class_ids if not 1 <= int(c) <= num_tv_classes]
    if bad:
        raise ValueError(f"class_ids {bad} out of range: the checkpoint has classes 1..{num_tv_classes}")
    out, unknown = _predictor(state, class_ids), []
    for key, value in state.items():
        if key.startswith("roi_heads.box_predictor.") or (key.startswith(_MASK_LOGITS)
                                                           and arch.startswith("maskrcnn")):
            continue
        new = _rename(key, arch)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ValueError(f"{len(unknown)} keys have no detkit counterpart for {arch}: "
                         f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
    return out


def use_torchvision_anchors(model: nn.Module) -> int:
    """Put every ``AnchorGenerator`` in ``model`` on torchvision's stride rounding; returns how many."""
    generators = [m for m in model.modules() if isinstance(m, AnchorGenerator)]
    for generator in generators:
        generator.stride_mode = "torchvision"
    return len(generators)


def apply_converted_meta(model: nn.Module, meta: Mapping) -> None:
    """Honour a converted checkpoint's ``meta`` (``tools/convert_weights.py``): its anchor stride mode."""
    if meta.get("anchor_stride_mode") == "torchvision":
        use_torchvision_anchors(model)


def load_torchvision_weights(model: nn.Module, source: str | Mapping[str, Tensor],
                             arch: str = "fasterrcnn_resnet50_fpn") -> None:
    """Convert ``source`` (a file path or a state dict) and load it strictly into ``model``.

    The class rows are chosen from the model's ``roi_head.num_classes``: all of the checkpoint's
    classes when the counts agree, the 80 COCO categories when a 90-class torchvision COCO
    checkpoint meets an 80-class model; anything else is an error. The model's anchors switch to
    torchvision's stride rounding (see the module docstring).
    """
    where = source if isinstance(source, str) else "state dict"
    loaded = torch.load(source, map_location="cpu", weights_only=True) if isinstance(source, str) else source
    num_classes = model.roi_head.num_classes  # type: ignore[union-attr]
    key = "roi_heads.box_predictor.cls_score.weight"
    inner = loaded.get("model", loaded) if isinstance(loaded, Mapping) else None
    state: Mapping[str, Tensor] = inner if isinstance(inner, Mapping) else {}
    if key not in state:
        raise ValueError(f"{where}: not a torchvision {arch} state dict (no {key})")
    num_tv = state[key].shape[0] - 1
    if num_tv == num_classes:
        class_ids = None
    elif num_tv == 90 and num_classes == 80:
        class_ids = COCO_CATEGORY_IDS
    else:
        raise ValueError(f"{where}: the checkpoint has {num_tv} foreground classes, the model "
                         f"{num_classes}; convert with explicit class_ids instead")
    converted = torchvision_to_detkit(state, arch, class_ids)
    load_state_dict_checked(model, converted, strict=True, source=where)
    use_torchvision_anchors(model)
