"""Backbone + neck forward time, parameters and GFLOPs at ``--size`` (default 640x640), batch 1."""

from __future__ import annotations

import argparse

import torch
from torch import nn

from benchmarks.common import count_flops, count_params, markdown_table, time_call

# name -> (backbone config, neck config or None); built through the registries like a config.
COMBINATIONS = {
    "R18-FPN": ({"type": "ResNet", "depth": 18}, {"type": "FPN", "extra_levels": "maxpool"}),
    "R50-FPN": ({"type": "ResNet", "depth": 50}, {"type": "FPN", "extra_levels": "maxpool"}),
    "R50-DCN-FPN": ({"type": "ResNet", "depth": 50, "dcn_stages": ["c3", "c4", "c5"]},
                    {"type": "FPN", "extra_levels": "maxpool"}),
    "R50-dilated (OS16, c5)": ({"type": "ResNet", "depth": 50, "output_stride": 16, "out_features": ["c5"]},
                               None),
    "Darknet53-YOLOv3Neck": ({"type": "Darknet53"}, {"type": "YOLOv3Neck"}),
    "Darknet53-YOLOv3Neck-SPP": ({"type": "Darknet53"}, {"type": "YOLOv3Neck", "spp": True}),
}


class BackboneNeck(nn.Module):
    def __init__(self, backbone: nn.Module, neck: nn.Module | None):
        super().__init__()
        self.backbone, self.neck = backbone, neck

    def forward(self, x):
        feats = self.backbone(x)
        return self.neck(feats) if self.neck is not None else feats


def build(backbone_cfg: dict, neck_cfg: dict | None) -> BackboneNeck:
    from detkit.models import BACKBONES, NECKS

    backbone = BACKBONES.build(dict(backbone_cfg), "backbone")
    neck = NECKS.build(dict(neck_cfg), "neck", input_shapes=backbone.output_shape()) if neck_cfg else None
    return BackboneNeck(backbone, neck)


def run(args: argparse.Namespace) -> None:
    rows = []
    for name, (backbone_cfg, neck_cfg) in COMBINATIONS.items():
        torch.manual_seed(0)
        model = build(backbone_cfg, neck_cfg).eval().to(args.device)
        x = torch.randn(1, 3, args.size, args.size, device=args.device)
        seconds = time_call(lambda model=model, x=x: model(x), args.repeats, args.warmup, args.device)
        gflops = count_flops(lambda model=model, x=x: model(x)) / 1e9
        outputs = ", ".join(f"{k}/{s.stride}" for k, s in
                            (model.neck or model.backbone).output_shape().items())
        rows.append([name, f"{count_params(model) / 1e6:.2f}", f"{gflops:.1f}",
                     f"{seconds * 1000:.0f}", outputs])
    print(f"batch 1, {args.size}x{args.size}, eval mode, forward only; GFLOPs = 2 x multiply-adds "
          f"(FlopCounterMode; deformable convs counted as dense convs)\n")
    print(markdown_table(["model", "params (M)", "GFLOPs", "forward (ms, median)", "outputs (name/stride)"],
                         rows))
