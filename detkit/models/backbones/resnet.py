"""ResNet backbone on torchvision's definitions (depth 18/34/50/101/152).

Submodule names are torchvision's (``conv1``, ``bn1``, ``layer1``..``layer4``; ``fc``/``avgpool``
dropped), so a torchvision ImageNet state dict loads by key. Outputs, for input Float[B,3,H,W]:

    c2: stride 4,  64 (18/34) or 256 (50+) channels      (layer1)
    c3: stride 8,  128 / 512                              (layer2)
    c4: stride 16, 256 / 1024                             (layer3)
    c5: stride 32, 512 / 2048                             (layer4)

Spatial size of cK is ceil(H / stride) (after dilation, the stride of c4/c5 can be 16 or 8).
Stages after the deepest requested output are removed.

``variant: vd`` builds ResNet-vd, RT-DETR's backbone (deep 3-conv stem ``stem.0..2`` instead of
``conv1``/``bn1``, avg-pool shortcut downsampling; see ``_resnet_vd.py``), optionally with other
widths and block counts (``stem_channels``, ``stage_channels``, ``stage_blocks``).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from ...errors import warn_once
from ...registry import BACKBONES
from ...structures import ShapeSpec
from ..layers.deform_conv import DeformConvBlock
from ..layers.frozen_bn import FrozenBatchNorm2d
from ..pretrained import download_torchvision_weights, read_backbone_weights
from ..utils import load_state_dict_checked
from ._frozen import FrozenStagesBackbone
from ._resnet_vd import VD_STAGE_BLOCKS, vd_stage, vd_stem

__all__ = ["ResNet"]

_DEPTHS = {18: "resnet18", 34: "resnet34", 50: "resnet50", 101: "resnet101", 152: "resnet152"}
_STAGES = ("c2", "c3", "c4", "c5")
_NORMS = {"BN": nn.BatchNorm2d, "SyncBN": nn.SyncBatchNorm, "FrozenBN": FrozenBatchNorm2d}
_VARIANTS = ("torchvision", "vd")


def _dilate_stage(layer: nn.Sequential, previous: int, dilation: int) -> None:
    """Trade the stride of a stage for ``dilation`` in its 3x3 convs (torchvision's rule).

    The strided conv of the first block keeps the previous stage's dilation (it still sees the
    previous resolution); every later 3x3 conv gets ``dilation``.
    """
    blocks: list[Any] = list(layer)   # torchvision's BasicBlock / Bottleneck (untyped)
    for i, block in enumerate(blocks):
        convs = [block.conv1, block.conv2] if isinstance(block, BasicBlock) else [block.conv2]
        for conv in convs:
            strided = conv.stride != (1, 1)
            d = previous if (i == 0 and strided) else dilation
            conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)
        if block.downsample is not None:
            if isinstance(block.downsample[0], nn.AvgPool2d):   # ResNet-vd: the pool downsamples
                block.downsample[0] = nn.Identity()
            else:
                block.downsample[0].stride = (1, 1)
        block.stride = 1


@BACKBONES.register()
class ResNet(FrozenStagesBackbone):
    """torchvision ResNet as a multi-scale feature extractor.

    Args:
        depth: 18, 34, 50, 101 or 152.
        out_features: which of c2..c5 ``forward`` returns.
        norm: ``BN``, ``SyncBN`` or ``FrozenBN`` (statistics and affine fixed, as torchvision's
            Faster R-CNN fine-tuning).
        frozen_stages: -1 trains everything; 0 freezes the stem (conv1, bn1); k >= 1 also
            freezes layer1..layerk (1 == torchvision's ``trainable_layers=3``). Frozen parameters
            get ``requires_grad=False`` and their BN layers stay in eval mode.
        dilation: stages whose stride becomes dilation, e.g. ``{c5: 2}`` (DC5, output stride 16)
            or ``{c4: 2, c5: 4}`` (output stride 8). Mutually exclusive with ``output_stride``.
        output_stride: 32 (default), 16 or 8: shorthand for the two ``dilation`` settings above.
        dcn_stages: stages (c3..c5) whose 3x3 convs become ``DeformConvBlock`` (``conv2`` of each
            block; the kernel keeps the key ``layerK.i.conv2.weight``).
        dcn_version: 1 (offsets) or 2 (offsets + modulation mask).
        weights: None, a torchvision weights name (``IMAGENET1K_V1``/``IMAGENET1K_V2``, downloaded
            by torchvision) or a local file (a state dict, or a dict with ``model``/``state_dict``).
        zero_init_residual: zero the last norm of each residual block (torchvision's option).
        variant: ``torchvision`` (the ResNet-B of torchvision) or ``vd`` (ResNet-vd, RT-DETR).
        stem_channels, stage_channels, stage_blocks: ``vd`` only: the stem width (64), the four
            stages' output channels (64/128/256/512, x4 for bottleneck depths) and blocks per
            stage (the depth's); the block type stays the depth's (basic for 18/34).
    """

    def __init__(self, *, depth: int = 50, out_features: Sequence[str] = ("c2", "c3", "c4", "c5"),
                 norm: str = "BN", frozen_stages: int = -1, dilation: dict | None = None,
                 output_stride: int | None = None, dcn_stages: Sequence[str] = (),
                 dcn_version: int = 1, weights: str | None = None, zero_init_residual: bool = False,
                 variant: str = "torchvision", stem_channels: int | None = None,
                 stage_channels: Sequence[int] | None = None, stage_blocks: Sequence[int] | None = None):
        super().__init__()
        if variant not in _VARIANTS:
            raise ValueError(f"ResNet: variant must be one of {list(_VARIANTS)}, got '{variant}'")
        if variant != "vd" and (stem_channels, stage_channels, stage_blocks) != (None, None, None):
            raise ValueError("ResNet: stem_channels, stage_channels and stage_blocks need variant: vd")
        if depth not in _DEPTHS:
            raise ValueError(f"ResNet: depth must be one of {sorted(_DEPTHS)}, got {depth}")
        if norm not in _NORMS:
            raise ValueError(f"ResNet: norm must be one of {', '.join(_NORMS)}, got '{norm}'")
        out_features = list(out_features)
        bad = [f for f in out_features if f not in _STAGES]
        if not out_features or bad:
            raise ValueError(f"ResNet: out_features must be a non-empty subset of {list(_STAGES)}, "
                             f"got {out_features}")
        if not -1 <= int(frozen_stages) <= 4:
            raise ValueError(f"ResNet: frozen_stages must be in -1..4, got {frozen_stages}")
        self.depth, self.norm, self.frozen_stages = depth, norm, int(frozen_stages)
        self.variant = variant
        self.out_features = sorted(out_features, key=_STAGES.index)
        self.num_stages = _STAGES.index(self.out_features[-1]) + 1
        if variant == "vd":
            self._build_vd(stem_channels, stage_channels, stage_blocks, zero_init_residual)
        else:
            self._build_torchvision(zero_init_residual)

        self._strides = self._apply_dilation(_resolve_dilation(dilation, output_stride))
        self._apply_dcn(list(dcn_stages), int(dcn_version))
        if weights is not None:
            self.load_weights(weights)
        elif norm == "FrozenBN":
            warn_once("ResNet: norm FrozenBN with weights: null keeps identity statistics, so nothing "
                      "normalises the activations and training from scratch tends to diverge (NaN loss); "
                      "set norm: BN (--set model.backbone.norm=BN) or give pretrained weights")
        self.freeze()

    # ----------------------------------------------------------------------------- construction
    def _build_torchvision(self, zero_init_residual: bool) -> None:
        net = getattr(torchvision.models, _DEPTHS[self.depth])(
            weights=None, norm_layer=_NORMS[self.norm], zero_init_residual=zero_init_residual)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        for i in range(1, self.num_stages + 1):
            setattr(self, f"layer{i}", getattr(net, f"layer{i}"))
        expansion = 4 if isinstance(net.layer1[0], Bottleneck) else 1
        self._channels = {f"c{i + 2}": 64 * 2 ** i * expansion for i in range(4)}

    def _build_vd(self, stem_channels: int | None, stage_channels: Sequence[int] | None,
                  stage_blocks: Sequence[int] | None, zero_init_residual: bool) -> None:
        bottleneck = self.depth >= 50
        stem = int(stem_channels or 64)
        default_channels = [64 * 2 ** i * (4 if bottleneck else 1) for i in range(4)]
        channels = [int(c) for c in stage_channels or default_channels]
        blocks = [int(b) for b in stage_blocks or VD_STAGE_BLOCKS[self.depth]]
        if len(channels) != 4 or len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"ResNet: stage_channels and stage_blocks need 4 entries (blocks >= 1), "
                             f"got {channels} and {blocks}")
        self.stem = vd_stem(stem, self.norm)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        previous = stem
        for i in range(self.num_stages):
            setattr(self, f"layer{i + 1}", vd_stage(
                bottleneck=bottleneck, in_channels=previous, out_channels=channels[i],
                num_blocks=blocks[i], stride=1 if i == 0 else 2, norm_layer=_NORMS[self.norm]))
            previous = channels[i]
        self._channels = {f"c{i + 2}": channels[i] for i in range(4)}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif zero_init_residual and isinstance(m, (Bottleneck, BasicBlock)):
                last_bn = m.bn3 if isinstance(m, Bottleneck) else m.bn2
                if isinstance(last_bn, nn.BatchNorm2d):
                    nn.init.zeros_(last_bn.weight)

    def _apply_dilation(self, dilation: dict[str, int]) -> dict[str, int]:
        strides, stride, previous = {}, 4, 1
        for i, name in enumerate(_STAGES):
            d = dilation.get(name, 1)
            if i > 0 and d == 1:
                stride *= 2
            if i < self.num_stages and d > 1:
                _dilate_stage(getattr(self, f"layer{i + 1}"), previous, d)
            strides[name] = stride
            previous = d
        return strides

    def _apply_dcn(self, stages: list[str], version: int) -> None:
        bad = [s for s in stages if s not in ("c3", "c4", "c5")]
        if bad:
            raise ValueError(f"ResNet: dcn_stages must be a subset of ['c3', 'c4', 'c5'], got {stages}")
        for name in stages:
            idx = _STAGES.index(name) + 1
            if idx > self.num_stages:
                continue
            for block in getattr(self, f"layer{idx}"):
                block.conv2 = DeformConvBlock.from_conv(block.conv2, version=version)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        stages = [getattr(self, f"layer{i}") for i in range(1, min(self.frozen_stages, self.num_stages) + 1)]
        stem = [self.stem] if self.variant == "vd" else [self.conv1, self.bn1]
        return stem + stages

    # ---------------------------------------------------------------------------------- weights
    def load_weights(self, weights: str) -> None:
        """Load a torchvision weights name (``IMAGENET1K_V1``) or a local state-dict file."""
        if os.path.sep in weights or os.path.exists(weights) or weights.endswith((".pth", ".pt")):
            source = weights   # a state dict, a checkpoint, or a tools/pretrain.py checkpoint
            state = read_backbone_weights(weights, "ResNet")
        elif self.variant == "vd":
            raise ValueError(f"ResNet: variant vd has no torchvision weights ('{weights}'); give a "
                             f"local state-dict file (e.g. converted from transformers)")
        else:
            source = f"torchvision ResNet{self.depth}_Weights.{weights}"
            try:
                enum = torchvision.models.get_weight(f"ResNet{self.depth}_Weights.{weights}")
            except (ValueError, KeyError) as e:
                raise ValueError(f"ResNet: unknown weights '{weights}' for depth {self.depth} (neither "
                                 f"an existing file nor a torchvision name such as IMAGENET1K_V1)") from e
            state = download_torchvision_weights(enum, owner=f"ResNet-{self.depth}", norm=self.norm)
        self.load_state_dict_from(state, source)

    def load_state_dict_from(self, state: dict, source: str = "state dict") -> None:
        """Load a torchvision-keyed state dict; drops ``fc`` and removed stages, allows ``module.``."""
        state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
        own = self.state_dict()
        removed = tuple(f"layer{i}." for i in range(self.num_stages + 1, 5)) + ("fc.",)
        state = {k: v for k, v in state.items() if not k.startswith(removed)}
        # Deformable convs add offset convs that no ImageNet checkpoint has; they start at zero.
        for k in own:
            if ".offset_conv." in k and k not in state:
                state[k] = own[k]
        load_state_dict_checked(self, state, strict=True, source=source)

    # ---------------------------------------------------------------------------------- forward
    def output_shape(self) -> dict[str, ShapeSpec]:
        return {n: ShapeSpec(channels=self._channels[n], stride=self._strides[n]) for n in self.out_features}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Float[B,3,H,W] (normalised) -> {cK: Float[B,C_K,ceil(H/s_K),ceil(W/s_K)]}."""
        if self.variant == "vd":
            x = self.maxpool(self.stem(x))
        else:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outputs = {}
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
            name = _STAGES[i]
            if name in self.out_features:
                outputs[name] = x
        return outputs


def _resolve_dilation(dilation: dict | None, output_stride: int | None) -> dict[str, int]:
    if dilation is not None and output_stride is not None:
        raise ValueError("ResNet: give either 'dilation' or 'output_stride', not both")
    if output_stride is not None:
        table = {32: {}, 16: {"c5": 2}, 8: {"c4": 2, "c5": 4}}
        if output_stride not in table:
            raise ValueError(f"ResNet: output_stride must be 32, 16 or 8, got {output_stride}")
        return table[output_stride]
    dilation = dict(dilation or {})
    for key, value in dilation.items():
        if key not in ("c4", "c5") or not isinstance(value, int) or value < 1:
            raise ValueError(f"ResNet: dilation must map c4/c5 to an integer >= 1, got {key}: {value}")
    return dilation
