"""Small random-weight transformers RT-DETR / RT-DETRv2 / D-FINE models and the detkit heads
converted from them, fed the same encoder outputs (captured by a hook on transformers' encoder)."""

from __future__ import annotations

import torch
from transformers import (
    DFineConfig,
    DFineForObjectDetection,
    RTDetrConfig,
    RTDetrForObjectDetection,
    RTDetrResNetConfig,
    RTDetrV2Config,
    RTDetrV2ForObjectDetection,
)

from detkit.models import HEADS
from detkit.models.convert.hf_detr import convert_head, head_config, is_head_key
from detkit.structures import ShapeSpec

ARCHS = {"rt_detr": (RTDetrConfig, RTDetrForObjectDetection),
         "rt_detr_v2": (RTDetrV2Config, RTDetrV2ForObjectDetection),
         "d_fine": (DFineConfig, DFineForObjectDetection)}

# two variants per family: level count (extra level by strided conv), projections (encoder width
# != d_model), point counts, v2's discrete method and offset scale, D-FINE's bins / reg_scale / up
VARIANTS = {
    "rtdetr_3lvl": ("rt_detr", {}),
    "rtdetr_4lvl_proj": ("rt_detr", dict(num_feature_levels=4, encoder_hidden_dim=48,
                                         decoder_in_channels=[48, 48, 48], decoder_n_points=3,
                                         decoder_layers=3, num_queries=40)),
    "rtdetrv2_3lvl": ("rt_detr_v2", {}),
    "rtdetrv2_4lvl_discrete": ("rt_detr_v2", dict(num_feature_levels=4, decoder_n_levels=4,
                                                  decoder_method="discrete", decoder_offset_scale=0.7,
                                                  decoder_n_points=2, decoder_layers=3)),
    "dfine_bins8": ("d_fine", dict(max_num_bins=8)),
    "dfine_bins16_proj": ("d_fine", dict(max_num_bins=16, reg_scale=2.0, up=0.7, layer_scale=2.0,
                                         decoder_n_points=[3, 6, 2], top_prob_values=3, lqe_hidden_dim=32,
                                         encoder_hidden_dim=48, decoder_in_channels=[48, 48, 48],
                                         decoder_layers=3)),
}


def small_config(arch: str, **overrides):
    backbone = RTDetrResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                  layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    kw = dict(backbone_config=backbone, encoder_in_channels=[32, 64, 128], encoder_hidden_dim=64, d_model=64,
              decoder_in_channels=[64, 64, 64], encoder_ffn_dim=128, decoder_ffn_dim=96, decoder_layers=2,
              num_queries=30, num_labels=5, encoder_attention_heads=4, decoder_attention_heads=4,
              num_denoising=20)
    kw.update(overrides)
    return ARCHS[arch][0](**kw)


@torch.no_grad()
def _randomise_head(model, generator):
    """transformers zero-initialises many head weights (box deltas, attention weights, gates, LQE):
    perturb every head tensor so that each path shows up in the outputs; BN statistics too."""
    for name, p in model.named_parameters():
        if is_head_key(name) and p.requires_grad:
            # the box heads' last layers get more, so that D-FINE's edge distributions are far
            # from flat (the weighting function, reg_scale and up then show in the boxes)
            strong = ".layers.2." in name and "bbox_embed" in name
            p.add_(torch.randn(p.shape, generator=generator) * (0.5 if strong else 0.1))
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d) and is_head_key(name + "."):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)


def build_pair(variant: str, seed: int = 0):
    """(transformers model in eval mode, its config, the converted detkit head in eval mode)."""
    arch, overrides = VARIANTS[variant]
    config = small_config(arch, **overrides)
    torch.manual_seed(seed)
    model = ARCHS[arch][1](config).eval()
    _randomise_head(model, torch.Generator().manual_seed(seed + 1))
    node = head_config(config)
    width = config.encoder_hidden_dim
    shapes = {"p3": ShapeSpec(width, 8), "p4": ShapeSpec(width, 16), "p5": ShapeSpec(width, 32)}
    head = HEADS.build(node, "model.head", input_shapes=shapes, num_classes=config.num_labels)
    state = {k[len("head."):]: v for k, v in convert_head(model.state_dict(), config).items()}
    head.load_state_dict(state, strict=True)
    return model, config, head.eval()


def real_looking_images(height: int = 160, width: int = 224, seed: int = 0) -> torch.Tensor:
    """Float[2,3,H,W] in [0,1]: smooth colour gradients, a few filled boxes and an ellipse, noise."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, height)[:, None]
    xs = torch.linspace(0, 1, width)[None, :]
    images = []
    for b in range(2):
        base = torch.rand(3, 1, 1, generator=g)
        img = (base * (0.6 + 0.4 * ys) * (0.7 + 0.3 * xs)).expand(3, height, width).clone()
        for _ in range(4):
            y0, x0 = (int(torch.randint(0, n - 30, (1,), generator=g)) for n in (height, width))
            h, w = (int(torch.randint(12, n, (1,), generator=g)) for n in (60, 80))
            img[:, y0:y0 + h, x0:x0 + w] = torch.rand(3, 1, 1, generator=g)
        cy, cx = 0.3 + 0.4 * b, 0.6
        img[:, ((ys - cy) ** 2 / 0.02 + (xs - cx) ** 2 / 0.05) < 1] = torch.rand(3, 1, generator=g)
        images.append((img + 0.03 * torch.randn(img.shape, generator=g)).clamp(0, 1))
    return torch.stack(images)


def capture_encoder_outputs(model, pixels, **kwargs):
    """Run the transformers model; return (its output, {p3, p4, p5} encoder maps it decoded)."""
    captured = {}

    def hook(_module, _inputs, output):
        captured["maps"] = list(output.last_hidden_state)

    handle = model.model.encoder.register_forward_hook(hook)
    try:
        out = model(pixel_values=pixels, **kwargs)
    finally:
        handle.remove()
    return out, dict(zip(["p3", "p4", "p5"], captured["maps"]))


def bn_eval_train_mode(module):
    """Training mode (all decoder layers reported, denoising on) but BN with running statistics,
    so that both sides see the same normalisation."""
    module.train()
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    return module


def max_abs(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())
