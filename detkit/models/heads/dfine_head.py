"""DFINEHead: D-FINE's decoder head (RT-DETR's pipeline with FDR boxes, gated layers and LQE).

Legend as in ``rtdetr_head.py``; R = reg_max. Besides RT-DETR's keys every layer dict has
``pred_corners`` Float[B,Q,4(R+1)], ``ref_points`` Float[B,Q,4] (the initial boxes), ``up`` and
``reg_scale`` (Float[1]); aux and denoising layer dicts carry ``teacher_corners`` /
``teacher_logits`` (the last layer's, for the DDF distillation); ``pre_outputs`` (and
``dn_pre_outputs``) hold the pre-bbox head's ``{pred_logits, pred_boxes}``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ...registry import HEADS
from ..detr.decoder import DecoderLayer
from ..detr.fdr import FDRDecoder
from .rtdetr_head import RTDETRHead

__all__ = ["DFINEHead"]


@HEADS.register()
class DFINEHead(RTDETRHead):
    """RTDETRHead's arguments plus FDR's: ``reg_max`` (R bins - 1 per edge), ``reg_scale`` and
    ``up`` (the weighting function's curvature and range), ``lqe_top_k`` / ``lqe_hidden_dim`` /
    ``lqe_layers`` (the location-quality estimator)."""

    gated_layers = True
    attention_projections = False
    identity_projections = True

    def __init__(self, *, reg_max: int = 32, reg_scale: float = 4.0, up: float = 0.5,
                 lqe_top_k: int = 4, lqe_hidden_dim: int = 64, lqe_layers: int = 2, **kwargs):
        self._fdr: dict[str, Any] = dict(reg_max=reg_max, reg_scale=reg_scale, up=up, lqe_top_k=lqe_top_k,
                         lqe_hidden_dim=lqe_hidden_dim, lqe_layers=lqe_layers)
        super().__init__(**kwargs)

    def build_decoder(self, layers: list[DecoderLayer], hidden_dim: int) -> nn.Module:
        return FDRDecoder(layers=layers, embed_dim=hidden_dim, num_classes=self.num_classes, **self._fdr)

    def decode(self, queries: Tensor, reference_logits: Tensor, memory: Tensor,
               shapes: list[tuple[int, int]], attn_mask: Tensor | None) -> tuple[list[dict], dict | None]:
        layers, pre = self.decoder(queries, reference_logits, memory, shapes, attn_mask)
        constants = {"up": self.decoder.up, "reg_scale": self.decoder.reg_scale}
        per_layer = [{"pred_logits": o["logits"], "pred_boxes": o["boxes"], "pred_corners": o["corners"],
                      "ref_points": o["ref_points"], **constants} for o in layers]
        return per_layer, {"pred_logits": pre["logits"], "pred_boxes": pre["boxes"]}
