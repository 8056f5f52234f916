"""YOLOv1 grid head ("You Only Look Once", Redmon et al., CVPR 2016), anchor-free.

Legend: B images, S_h x S_w grid cells (one per feature pixel of the chosen level), P box
predictors per cell (the paper's B), C classes, N ground-truth boxes of one image.

Per cell the head predicts P boxes ``(x, y, sqrt(w), sqrt(h), confidence)`` and one set of C class
probabilities. ``x, y`` are the box centre's offset inside its cell in [0, 1] (sigmoid), ``sqrt(w),
sqrt(h)`` are relative to the padded input size (the paper regresses square roots so that an
error on a small box costs more than the same error on a large one), confidence is
``Pr(object) * IoU`` (sigmoid). Class probabilities are a softmax per cell.

Loss (sum-squared error, paper eq. 3), summed over the batch and divided by the batch size:

    lambda_coord * sum_resp [(x-x^)^2 + (y-y^)^2 + (sqrt w - sqrt w^)^2 + (sqrt h - sqrt h^)^2]
  + sum_resp (conf - IoU(pred, gt))^2 + lambda_noobj * sum_not_resp conf^2
  + sum_cells_with_obj sum_c (p(c) - 1[c = gt])^2

with lambda_coord 5 and lambda_noobj 0.5. The *responsible* predictor of an object is the one of
the P predictors in the cell holding the object's centre whose current box has the highest IoU
with it. Deviations, all documented here:

* the grid is the feature map (S = input / stride) instead of a fixed 7 x 7 after FC layers, so
  any input size works; at 448 px with a stride-64 level this is the paper's 7 x 7;
* a cell holds one object (as in the paper); when several centres fall in one cell, the largest
  box is kept (the paper leaves this open);
* ``rescore=False`` trains confidence towards 1 instead of the IoU (a common variant);
* crowd and VOC ``difficult`` boxes are never assigned; predictors in their cells get no
  no-object loss (the other heads and the VOC evaluator ignore difficult boxes too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from ...registry import HEADS
from ...structures import ShapeSpec

__all__ = ["YOLOv1Head", "yolov1_decode_boxes", "yolov1_encode_targets"]


def _grid(h: int, w: int, device) -> tuple[Tensor, Tensor]:
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return xs.float(), ys.float()


def yolov1_decode_boxes(box_params: Tensor, stride: int) -> Tensor:
    """Float[B,P,4,S_h,S_w] (x, y, sqrt w, sqrt h) -> Float[B,P,S_h,S_w,4] xyxy input pixels.

    ``x, y`` in [0,1] within the cell; ``sqrt w/h`` relative to the grid extent (S * stride).
    """
    _, _, _, sh, sw = box_params.shape
    xs, ys = _grid(sh, sw, box_params.device)
    cx = (box_params[:, :, 0] + xs) * stride
    cy = (box_params[:, :, 1] + ys) * stride
    w = box_params[:, :, 2].clamp(min=0) ** 2 * (sw * stride)
    h = box_params[:, :, 3].clamp(min=0) ** 2 * (sh * stride)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def yolov1_encode_targets(boxes: Tensor, labels: Tensor, grid: tuple[int, int], stride: int) -> dict:
    """Place N xyxy boxes on an S_h x S_w grid, one object per cell (largest wins).

    Returns ``obj`` Bool[S_h,S_w], ``box`` Float[4,S_h,S_w] (x, y, sqrt w, sqrt h) and ``label``
    Int64[S_h,S_w] (-1 where empty), and ``gt_xyxy`` Float[S_h,S_w,4].
    """
    sh, sw = grid
    device = boxes.device
    obj = torch.zeros(sh, sw, dtype=torch.bool, device=device)
    box = torch.zeros(4, sh, sw, device=device)
    label = torch.full((sh, sw), -1, dtype=torch.int64, device=device)
    gt_xyxy = torch.zeros(sh, sw, 4, device=device)
    if boxes.numel() == 0:
        return {"obj": obj, "box": box, "label": label, "gt_xyxy": gt_xyxy}
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    w = (boxes[:, 2] - boxes[:, 0]).clamp(min=0)
    h = (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    col = (cx / stride).floor().long().clamp(0, sw - 1)
    row = (cy / stride).floor().long().clamp(0, sh - 1)
    # Ascending area: when two centres share a cell the larger box is written last and kept.
    for i in torch.argsort(w * h).tolist():
        r, c = row[i], col[i]
        obj[r, c] = True
        box[:, r, c] = torch.stack([cx[i] / stride - c, cy[i] / stride - r,
                                    (w[i] / (sw * stride)).sqrt(), (h[i] / (sh * stride)).sqrt()])
        label[r, c] = labels[i]
        gt_xyxy[r, c] = boxes[i]
    return {"obj": obj, "box": box, "label": label, "gt_xyxy": gt_xyxy}


@HEADS.register()
class YOLOv1Head(nn.Module):
    """YOLOv1 detection head on one feature level (see the module docstring for the method)."""

    def __init__(self, *, input_shapes: dict[str, ShapeSpec], num_classes: int, in_feature: str | None = None,
                 num_boxes: int = 2, hidden_channels: int = 256, num_convs: int = 2,
                 lambda_coord: float = 5.0, lambda_noobj: float = 0.5, rescore: bool = True,
                 score_thr: float = 0.05, nms_thr: float = 0.5, max_detections: int = 100):
        super().__init__()
        self.in_feature = in_feature or max(input_shapes, key=lambda k: input_shapes[k].stride)
        if self.in_feature not in input_shapes:
            raise ValueError(f"in_feature '{self.in_feature}' not among the inputs {sorted(input_shapes)}")
        spec = input_shapes[self.in_feature]
        self.stride = spec.stride
        self.num_classes = num_classes
        self.num_boxes = num_boxes
        self.lambda_coord, self.lambda_noobj, self.rescore = lambda_coord, lambda_noobj, rescore
        self.score_thr, self.nms_thr, self.max_detections = score_thr, nms_thr, max_detections
        layers, ch = [], spec.channels
        for _ in range(num_convs):
            layers += [nn.Conv2d(ch, hidden_channels, 3, padding=1, bias=False),
                       nn.BatchNorm2d(hidden_channels), nn.LeakyReLU(0.1, inplace=True)]
            ch = hidden_channels
        self.tower = nn.Sequential(*layers)
        self.predictor = nn.Conv2d(ch, num_boxes * 5 + num_classes, 1)

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """-> ``box`` Float[B,P,4,S_h,S_w] (x, y, sqrt w, sqrt h), ``conf`` Float[B,P,S_h,S_w],
        ``cls_prob`` Float[B,C,S_h,S_w] (softmax)."""
        raw = self.predictor(self.tower(features[self.in_feature]))
        b, _, sh, sw = raw.shape
        boxes = raw[:, : self.num_boxes * 5].view(b, self.num_boxes, 5, sh, sw).sigmoid()
        return {"box": boxes[:, :, :4], "conf": boxes[:, :, 4],
                "cls_prob": raw[:, self.num_boxes * 5:].softmax(dim=1)}

    def _ignored_cells(self, target: dict, ignored: Tensor, grid: tuple[int, int]) -> Tensor:
        """Bool[S_h,S_w]: cells overlapped by an ignored (crowd / difficult) box."""
        mask = torch.zeros(grid, dtype=torch.bool, device=ignored.device)
        if ignored.any():
            for x0, y0, x1, y1 in target["boxes"][ignored].tolist():
                mask[int(y0 // self.stride): int(y1 // self.stride) + 1,
                     int(x0 // self.stride): int(x1 // self.stride) + 1] = True
        return mask

    def assign(self, outputs: dict[str, Tensor], targets: list[dict]) -> dict[str, Tensor]:
        """Per image grid targets plus ``responsible`` Bool[B,P,S_h,S_w] and ``iou`` Float[B,P,S_h,S_w]."""
        b, p, _, sh, sw = outputs["box"].shape
        pred_xyxy = yolov1_decode_boxes(outputs["box"].detach(), self.stride)  # [B,P,S,S,4]
        enc, ignored_cells = [], []
        for t in targets:
            ignored = _ignored_boxes(t)
            enc.append(yolov1_encode_targets(t["boxes"][~ignored], t["labels"][~ignored], (sh, sw),
                                             self.stride))
            ignored_cells.append(self._ignored_cells(t, ignored, (sh, sw)))
        obj = torch.stack([e["obj"] for e in enc])                      # [B,S,S]
        gt_xyxy = torch.stack([e["gt_xyxy"] for e in enc])              # [B,S,S,4]
        iou = _paired_iou(pred_xyxy, gt_xyxy[:, None].expand_as(pred_xyxy))  # [B,P,S,S]
        best = iou.argmax(dim=1)                                        # [B,S,S]
        responsible = F.one_hot(best, p).permute(0, 3, 1, 2).bool() & obj[:, None]
        return {"obj": obj, "box": torch.stack([e["box"] for e in enc]),
                "label": torch.stack([e["label"] for e in enc]), "responsible": responsible,
                "iou": iou * obj[:, None], "ignore": torch.stack(ignored_cells) & ~obj}

    def loss(self, outputs: dict[str, Tensor], targets: list[dict], image_sizes) -> dict[str, Tensor]:
        a = self.assign(outputs, targets)
        batch = outputs["box"].shape[0]
        resp = a["responsible"]
        coord_err = ((outputs["box"] - a["box"][:, None]) ** 2).sum(dim=2)        # [B,P,S,S]
        loss_box = self.lambda_coord * (coord_err * resp).sum() / batch
        conf_target = a["iou"] if self.rescore else torch.ones_like(a["iou"])
        conf_err = (outputs["conf"] - conf_target) ** 2
        noobj = ~resp & ~a["ignore"][:, None]
        loss_obj = (conf_err * resp).sum() / batch
        loss_noobj = self.lambda_noobj * (outputs["conf"] ** 2 * noobj).sum() / batch
        onehot = F.one_hot(a["label"].clamp(min=0), self.num_classes).permute(0, 3, 1, 2).float()
        loss_cls = (((outputs["cls_prob"] - onehot) ** 2).sum(dim=1) * a["obj"]).sum() / batch
        return {"loss_box": loss_box, "loss_obj": loss_obj, "loss_noobj": loss_noobj, "loss_cls": loss_cls}

    @torch.no_grad()
    def predict(self, outputs: dict[str, Tensor], image_sizes) -> list[dict]:
        """Class-specific confidence p(c) * conf, threshold, per-class NMS, clip to the image."""
        boxes_all = yolov1_decode_boxes(outputs["box"], self.stride)          # [B,P,S,S,4]
        results = []
        for i, (h, w) in enumerate(image_sizes):
            scores = outputs["conf"][i][:, None] * outputs["cls_prob"][i][None]   # [P,C,S,S]
            scores = scores.permute(0, 2, 3, 1).reshape(-1, self.num_classes)     # [P*S*S, C]
            boxes = boxes_all[i].reshape(-1, 1, 4).expand(-1, self.num_classes, 4).reshape(-1, 4)
            labels = torch.arange(self.num_classes, device=scores.device).repeat(scores.shape[0])
            scores = scores.reshape(-1)
            keep = scores > self.score_thr
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                                 boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], dim=1)
            keep = batched_nms(boxes, scores, labels, self.nms_thr)[: self.max_detections]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results


def _ignored_boxes(target: dict) -> Tensor:
    """Bool[N]: crowd or difficult boxes (never positives; see the module docstring)."""
    ignored = torch.zeros(len(target["boxes"]), dtype=torch.bool, device=target["boxes"].device)
    for key in ("iscrowd", "difficult"):
        if key in target:
            ignored |= target[key].bool()
    return ignored


def _paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boxes paired element-wise: Float[...,4] x Float[...,4] -> Float[...]."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a + area_b - inter).clamp(min=1e-9)

