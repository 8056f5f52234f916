"""HGNetv2 (PP-HGNetV2), the backbone of D-FINE, with the B0..B6 presets of the released models.

Input Float[B,3,H,W] -> {cK: Float[B,C_K,H_K,W_K]}: the stem has stride 4 and each stage whose
``downsample`` is set halves the size (ceil), so with the presets

    c2: stride 4 (stage 1), c3: stride 8, c4: stride 16, c5: stride 32.

Stem: conv3x3/2 -> [pad, conv2x2 -> pad, conv2x2] beside [maxpool2x2/1 of the padded map],
concatenated -> conv3x3/2 -> conv1x1. A stage: optional depthwise conv3x3/2 (no activation), then
``num_blocks`` HG blocks; an HG block chains ``num_layers`` convs (kxk, or "light": 1x1 without
activation + depthwise kxk), concatenates its input with every conv's output and aggregates them
by two 1x1 convs (to out/2, then out); blocks after the first add their input (residual).
``use_lab`` puts a learnable scalar affine (scale * x + bias) after every activated conv.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...registry import BACKBONES
from ...structures import ShapeSpec
from ..layers.conv import ConvNormAct
from ..pretrained import read_backbone_weights
from ..utils import load_state_dict_checked
from ._frozen import FrozenStagesBackbone

__all__ = ["HGNetv2", "HGNETV2_PRESETS"]

_STAGES = ("c2", "c3", "c4", "c5")
_STAGE_KEYS = ("in_channels", "mid_channels", "out_channels", "num_blocks", "downsample",
               "light_block", "kernel_size", "num_layers")


def _preset(stem: list[int], rows: list[list[Any]]) -> dict[str, Any]:
    return {"stem_channels": stem, "stages": [dict(zip(_STAGE_KEYS, row)) for row in rows]}


# The architectures of PP-HGNetV2 B0..B6 as D-FINE uses them (stem: in, mid, out; each stage row:
# in, mid, out, blocks, downsample, light block, kernel size, convs per block).
HGNETV2_PRESETS: dict[str, dict[str, Any]] = {
    "B0": _preset([3, 16, 16], [[16, 16, 64, 1, False, False, 3, 3], [64, 32, 256, 1, True, False, 3, 3],
                            [256, 64, 512, 2, True, True, 5, 3], [512, 128, 1024, 1, True, True, 5, 3]]),
    "B1": _preset([3, 24, 32], [[32, 32, 64, 1, False, False, 3, 3], [64, 48, 256, 1, True, False, 3, 3],
                            [256, 96, 512, 2, True, True, 5, 3], [512, 192, 1024, 1, True, True, 5, 3]]),
    "B2": _preset([3, 24, 32], [[32, 32, 96, 1, False, False, 3, 4], [96, 64, 384, 1, True, False, 3, 4],
                            [384, 128, 768, 3, True, True, 5, 4], [768, 256, 1536, 1, True, True, 5, 4]]),
    "B3": _preset([3, 24, 32], [[32, 32, 128, 1, False, False, 3, 5], [128, 64, 512, 1, True, False, 3, 5],
                            [512, 128, 1024, 3, True, True, 5, 5], [1024, 256, 2048, 1, True, True, 5, 5]]),
    "B4": _preset([3, 32, 48], [[48, 48, 128, 1, False, False, 3, 6], [128, 96, 512, 1, True, False, 3, 6],
                            [512, 192, 1024, 3, True, True, 5, 6], [1024, 384, 2048, 1, True, True, 5, 6]]),
    "B5": _preset([3, 32, 64], [[64, 64, 128, 1, False, False, 3, 6], [128, 128, 512, 2, True, False, 3, 6],
                            [512, 256, 1024, 5, True, True, 5, 6], [1024, 512, 2048, 2, True, True, 5, 6]]),
    "B6": _preset([3, 48, 96], [[96, 96, 192, 2, False, False, 3, 6], [192, 192, 512, 3, True, False, 3, 6],
                            [512, 384, 1024, 6, True, True, 5, 6], [1024, 768, 2048, 3, True, True, 5, 6]]),
}


class LearnableAffine(nn.Module):
    """y = scale * x + bias with two learnable scalars (initialised to the identity)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x + self.bias


def _conv(cin: int, cout: int, k: int, stride: int = 1, *, groups: int = 1, act: bool = True,
          lab: bool = False, norm: str = "BN") -> ConvNormAct:
    """ConvNormAct with HGNet's padding (k-1)//2 and, after an activation, the optional LAB."""
    block = ConvNormAct(cin, cout, k, stride, padding=(k - 1) // 2, groups=groups, norm=norm,
                        act="relu" if act else None)
    if act and lab:
        block.add_module("lab", LearnableAffine())
    return block


class _Stem(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, lab: bool, norm: str):
        super().__init__()
        self.conv1 = _conv(cin, mid, 3, 2, lab=lab, norm=norm)
        self.conv2a = _conv(mid, mid // 2, 2, lab=lab, norm=norm)
        self.conv2b = _conv(mid // 2, mid, 2, lab=lab, norm=norm)
        self.conv3 = _conv(2 * mid, mid, 3, 2, lab=lab, norm=norm)
        self.conv4 = _conv(mid, cout, 1, lab=lab, norm=norm)

    def forward(self, x: Tensor) -> Tensor:
        """Float[B,3,H,W] -> Float[B,out,ceil(H/4),ceil(W/4)]."""
        x = F.pad(self.conv1(x), (0, 1, 0, 1))   # the 2x2 convs / pool keep the size after padding
        branch = self.conv2b(F.pad(self.conv2a(x), (0, 1, 0, 1)))
        pooled = F.max_pool2d(x, kernel_size=2, stride=1, ceil_mode=True)
        return self.conv4(self.conv3(torch.cat([pooled, branch], dim=1)))


class _LightConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, lab: bool, norm: str):
        super().__init__()
        self.pointwise = _conv(cin, cout, 1, act=False, norm=norm)
        self.depthwise = _conv(cout, cout, k, groups=cout, lab=lab, norm=norm)


class HGBlock(nn.Module):
    """Float[B,in,H,W] -> Float[B,out,H,W]: chained convs, concatenation, 1x1 aggregation."""

    def __init__(self, cin: int, mid: int, cout: int, *, num_layers: int, kernel_size: int,
                 light_block: bool, residual: bool, lab: bool, norm: str):
        super().__init__()
        self.residual = residual
        self.convs = nn.ModuleList(
            _LightConv(cin if i == 0 else mid, mid, kernel_size, lab, norm) if light_block
            else _conv(cin if i == 0 else mid, mid, kernel_size, lab=lab, norm=norm)
            for i in range(num_layers))
        self.squeeze = _conv(cin + num_layers * mid, cout // 2, 1, lab=lab, norm=norm)
        self.excite = _conv(cout // 2, cout, 1, lab=lab, norm=norm)

    def forward(self, x: Tensor) -> Tensor:
        outputs = [x]
        for conv in self.convs:
            outputs.append(conv(outputs[-1]))
        y = self.excite(self.squeeze(torch.cat(outputs, dim=1)))
        return y + x if self.residual else y


class HGStage(nn.Module):
    def __init__(self, spec: dict[str, Any], lab: bool, norm: str):
        super().__init__()
        cin, cout = int(spec["in_channels"]), int(spec["out_channels"])
        self.downsample = (_conv(cin, cin, 3, 2, groups=cin, act=False, norm=norm)
                           if spec["downsample"] else nn.Identity())
        self.blocks = nn.Sequential(*(
            HGBlock(cin if i == 0 else cout, int(spec["mid_channels"]), cout,
                    num_layers=int(spec["num_layers"]), kernel_size=int(spec["kernel_size"]),
                    light_block=bool(spec["light_block"]), residual=i > 0, lab=lab, norm=norm)
            for i in range(int(spec["num_blocks"]))))

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


@BACKBONES.register()
class HGNetv2(FrozenStagesBackbone):
    """HGNetv2 feature extractor.

    Args:
        name: a preset of :data:`HGNETV2_PRESETS` (``B0``..``B6``), or None when ``stem_channels``
            and ``stages`` give the whole architecture.
        stem_channels: [in, mid, out] overriding the preset's stem.
        stages: four stage dicts (keys ``in_channels, mid_channels, out_channels, num_blocks,
            downsample, light_block, kernel_size, num_layers``) overriding the preset's stages.
        use_lab: learnable affine blocks (D-FINE-N/S/M use them, L/X not).
        out_features: which of c2..c5 ``forward`` returns.
        norm: ``BN``, ``SyncBN`` or ``FrozenBN`` (D-FINE freezes the backbone's norms).
        frozen_stages: -1 trains everything, 0 freezes the stem (D-FINE's ``freeze_at: 0``), k >= 1
            also stages 1..k.
        weights: None or a local state-dict file with detkit HGNetv2 keys.
    """

    def __init__(self, *, name: str | None = "B4", stem_channels: Sequence[int] | None = None,
                 stages: Sequence[dict] | None = None, use_lab: bool = False,
                 out_features: Sequence[str] = ("c3", "c4", "c5"), norm: str = "BN",
                 frozen_stages: int = -1, weights: str | None = None):
        super().__init__()
        stem, specs = _architecture(name, stem_channels, stages)
        out_features = list(out_features)
        if not out_features or any(f not in _STAGES for f in out_features):
            raise ValueError(f"HGNetv2: out_features must be a non-empty subset of {list(_STAGES)}, "
                             f"got {out_features}")
        if not -1 <= int(frozen_stages) <= 4:
            raise ValueError(f"HGNetv2: frozen_stages must be in -1..4, got {frozen_stages}")
        self.out_features = sorted(out_features, key=_STAGES.index)
        self.frozen_stages = int(frozen_stages)
        self.num_stages = _STAGES.index(self.out_features[-1]) + 1
        self.stem = _Stem(stem[0], stem[1], stem[2], lab=use_lab, norm=norm)
        self.stages = nn.ModuleList(HGStage(specs[i], use_lab, norm) for i in range(self.num_stages))
        self._shapes, stride = {}, 4
        for i, spec in enumerate(specs):
            stride *= 2 if spec["downsample"] else 1
            self._shapes[_STAGES[i]] = ShapeSpec(int(spec["out_channels"]), stride)
        if weights is not None:
            state = read_backbone_weights(weights, "HGNetv2")
            removed = tuple(f"stages.{i}." for i in range(self.num_stages, 4))  # stages not built
            state = {k: v for k, v in state.items() if not k.startswith(removed)}
            load_state_dict_checked(self, state, strict=True, source=weights)
        self.freeze()

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.stem] + list(self.stages)[:self.frozen_stages]

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {n: self._shapes[n] for n in self.out_features}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Float[B,3,H,W] (normalised) -> {cK: Float[B,C_K,H_K,W_K]}."""
        x = self.stem(x)
        outputs = {}
        for name, stage in zip(_STAGES, self.stages):
            x = stage(x)
            if name in self.out_features:
                outputs[name] = x
        return outputs


def _architecture(name: str | None, stem_channels: Sequence[int] | None,
                  stages: Sequence[dict] | None) -> tuple[list[int], list[dict]]:
    if name is not None and name not in HGNETV2_PRESETS:
        raise ValueError(f"HGNetv2: unknown name '{name}'; presets: {', '.join(HGNETV2_PRESETS)}")
    preset = HGNETV2_PRESETS[name] if name is not None else None
    if preset is None and (stem_channels is None or stages is None):
        raise ValueError("HGNetv2: give a preset name (B0..B6) or both stem_channels and stages")
    stem = list(stem_channels if stem_channels is not None else preset["stem_channels"])  # type: ignore[index]
    specs = [dict(s) for s in (stages if stages is not None else preset["stages"])]  # type: ignore[index]
    if len(stem) != 3:
        raise ValueError(f"HGNetv2: stem_channels must be [in, mid, out], got {stem}")
    if len(specs) != 4:
        raise ValueError(f"HGNetv2: stages must list 4 stages, got {len(specs)}")
    for i, spec in enumerate(specs):
        keys = set(spec)
        if keys != set(_STAGE_KEYS):
            raise ValueError(f"HGNetv2: stages[{i}] has keys {sorted(keys)}; expected exactly "
                             f"{list(_STAGE_KEYS)} (missing {sorted(set(_STAGE_KEYS) - keys)}, "
                             f"unknown {sorted(keys - set(_STAGE_KEYS))})")
    return stem, specs
