"""transformers model folders -> detkit checkpoints: the converted model equals transformers.

Each case builds a small ``RTDetrForObjectDetection`` / ``RTDetrV2ForObjectDetection`` /
``DFineForObjectDetection`` from a config with random weights (BatchNorm statistics randomised so
that they matter), saves it as the Hub would serve it (``save_pretrained`` + the image processor),
converts the folder with ``tools/convert_weights.py --from-transformers`` and compares:

* the raw outputs of the last decoder layer (logits, boxes) to 1e-4;
* the top-100 detections after each side's own post-processing, mapped to the original images of
  two different, non-square sizes: scores to 1e-4, boxes to 0.1 px (transformers' clipped to the
  image, as detkit's output contract clips), same labels.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from detkit.data.shapes import render_image  # noqa: E402
from detkit.inference import Predictor  # noqa: E402
from detkit.models.convert.hf_defaults import DEFAULT_BACKBONE, HF_DEFAULTS  # noqa: E402
from detkit.models.convert.transformers import ConversionError, from_transformers  # noqa: E402

SIZE = (192, 256)   # processor (height, width): non-square, a multiple of 32


def convert_main(argv):
    path = Path(__file__).resolve().parents[2] / "tools" / "convert_weights.py"
    spec = importlib.util.spec_from_file_location("detkit_tools_convert_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def _resnet(**kw):
    base = dict(embedding_size=16, hidden_sizes=[16, 24, 32, 48], depths=[1, 1, 1, 1],
                layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    return transformers.RTDetrResNetConfig(**{**base, **kw})


def _hgnet(**kw):
    base = dict(stem_channels=[3, 8, 16], stage_in_channels=[16, 32, 64, 96],
                stage_mid_channels=[8, 16, 24, 32], stage_out_channels=[32, 64, 96, 128],
                stage_num_blocks=[1, 1, 1, 1], stage_numb_of_layers=[2, 2, 2, 2],
                stage_kernel_size=[3, 3, 5, 5], stage_light_block=[False, False, True, True],
                stage_downsample=[False, True, True, True], use_learnable_affine_block=False,
                out_features=["stage2", "stage3", "stage4"])
    base["hidden_sizes"] = base["stage_out_channels"]   # transformers reads the widths from here
    return transformers.HGNetV2Config(**{**base, **kw})


def _common(channels, **kw):
    base = dict(encoder_hidden_dim=32, encoder_in_channels=channels, encoder_ffn_dim=64,
                encoder_attention_heads=4, d_model=32, decoder_in_channels=[32, 32, 32],
                decoder_ffn_dim=64, decoder_attention_heads=4, decoder_layers=2, num_queries=30,
                num_labels=5, num_denoising=10)
    return {**base, **kw}


CASES = {
    "rtdetr_r18vd": lambda: transformers.RTDetrConfig(backbone_config=_resnet(),
                                                      **_common([24, 32, 48])),
    "rtdetr_r50vd_4levels": lambda: transformers.RTDetrConfig(
        backbone_config=_resnet(layer_type="bottleneck", hidden_sizes=[32, 48, 64, 96]),
        **_common([48, 64, 96], num_feature_levels=4, decoder_in_channels=[32, 32, 32],
                  decoder_n_points=3)),
    "rtdetr_v2": lambda: transformers.RTDetrV2Config(
        backbone_config=_resnet(), **_common([24, 32, 48], decoder_n_points=2,
                                             decoder_offset_scale=0.25)),
    "rtdetr_v2_discrete": lambda: transformers.RTDetrV2Config(
        backbone_config=_resnet(), **_common([24, 32, 48], decoder_method="discrete")),
    "dfine_n_like": lambda: transformers.DFineConfig(
        backbone_config=_hgnet(out_features=["stage3", "stage4"]),
        **_common([96, 128], feat_strides=[16, 32], num_feature_levels=2,
                  decoder_in_channels=[32, 32], encode_proj_layers=[1], decoder_n_points=[6, 6],
                  hidden_expansion=0.34, depth_mult=0.5)),
    "dfine_s_like": lambda: transformers.DFineConfig(
        backbone_config=_hgnet(use_learnable_affine_block=True),
        **_common([64, 96, 128], decoder_n_points=[3, 6, 3], layer_scale=1.0, max_num_bins=16)),
}


def _randomise_bn(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)


def _save_model(tmp_path, name):
    torch.manual_seed(0)
    config = CASES[name]()
    cls = {"rt_detr": transformers.RTDetrForObjectDetection,
           "rt_detr_v2": transformers.RTDetrV2ForObjectDetection,
           "d_fine": transformers.DFineForObjectDetection}[config.model_type]
    model = cls(config).eval()
    _randomise_bn(model, 1)
    with torch.no_grad():   # spread the scores: a fresh init scores many queries alike (near-ties)
        g = torch.Generator().manual_seed(2)
        for name, p in model.named_parameters():
            if "class_embed" in name or "score_head" in name or "bbox_embed" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    folder = tmp_path / name
    model.save_pretrained(folder)
    transformers.RTDetrImageProcessor(size={"height": SIZE[0], "width": SIZE[1]}).save_pretrained(folder)
    return model, folder


def _images():
    """Two real-looking RGB images of different non-square sizes (uint8 HxWx3)."""
    import cv2

    a = render_image(0, "val", 3, size=128)[0]
    b = render_image(0, "val", 5, size=128)[0]
    rng = np.random.default_rng(0)
    # light sensor-like noise: flat synthetic areas give identical queries, hence exactly tied
    # scores, whose order top-k with another k does not keep
    return [np.clip(cv2.resize(im, size).astype(np.float32) + rng.normal(0, 3, (*size[::-1], 3)), 0, 255)
            .astype(np.uint8) for im, size in ((a, (301, 217)), (b, (180, 260)))]


def _pixel_values(images):
    """The resized [0,1] batch both sides see (transformers' processor resizes with PIL)."""
    import cv2

    return torch.stack([torch.from_numpy(cv2.resize(im, (SIZE[1], SIZE[0]), interpolation=cv2.INTER_LINEAR))
                        .permute(2, 0, 1).float() / 255 for im in images])


@pytest.mark.parametrize("name", list(CASES))
def test_converted_checkpoint_equals_transformers(tmp_path, name):
    hf_model, folder = _save_model(tmp_path, name)
    ckpt_path = tmp_path / "converted.pth"
    assert convert_main(["--from-transformers", str(folder), str(ckpt_path)]) == 0

    predictor = Predictor(None, str(ckpt_path), score_thr=0.0, device="cpu")
    model = predictor.model
    images = _images()
    pixels = _pixel_values(images)
    with torch.no_grad():
        ref = hf_model(pixel_values=pixels)
        raw = model.head(model.features(model.preprocess(list(pixels))))
    torch.testing.assert_close(raw["pred_logits"], ref.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(raw["pred_boxes"], ref.pred_boxes, atol=1e-4, rtol=1e-4)

    processor = transformers.RTDetrImageProcessor(size={"height": SIZE[0], "width": SIZE[1]})
    sizes = [im.shape[:2] for im in images]
    ref_dets = processor.post_process_object_detection(ref, threshold=0.0, target_sizes=sizes)
    metas = [{"scale": (SIZE[1] / im.shape[1], SIZE[0] / im.shape[0]), "orig_size": im.shape[:2]}
             for im in images]
    with torch.no_grad():
        dets = model(list(pixels), metas)
    for det, r, im in zip(dets, ref_dets, images):
        h, w = im.shape[:2]     # detkit clips to the image (its output contract); transformers does not
        ref_boxes = torch.stack([r["boxes"][:, 0].clamp(0, w), r["boxes"][:, 1].clamp(0, h),
                                 r["boxes"][:, 2].clamp(0, w), r["boxes"][:, 3].clamp(0, h)], 1)
        k = min(100, len(r["scores"]))   # transformers keeps num_queries detections
        torch.testing.assert_close(det["scores"][:k], r["scores"][:k], atol=1e-4, rtol=0)
        # Random weights score many queries alike (exact float ties), and top-k orders ties by
        # its k: each transformers detection must be one of detkit's with the same score, label
        # and box (0.1 px), rather than at the same rank.
        for score, label, box in zip(r["scores"][:k], r["labels"][:k], ref_boxes[:k]):
            same = ((det["scores"] - score).abs() <= 1e-4) & (det["labels"] == label)
            assert same.any(), (float(score), int(label))
            assert (det["boxes"][same] - box).abs().max(dim=1).values.min() <= 0.1, box


def test_the_defaults_table_equals_transformers_defaults():
    skip = {"architectures", "id2label", "label2id", "output_attentions", "output_hidden_states",
            "return_dict", "dtype", "chunk_size_feed_forward", "problem_type", "_name_or_path",
            "transformers_version", "tie_word_embeddings", "backbone_config",
            "is_encoder_decoder", "stage_names"}
    for cls in (transformers.RTDetrConfig, transformers.RTDetrV2Config, transformers.DFineConfig,
                transformers.RTDetrResNetConfig, transformers.HGNetV2Config):
        current = {k: list(v) if isinstance(v, tuple) else v
                   for k, v in cls().to_dict().items() if k not in skip}
        current.pop("model_type", None)
        assert HF_DEFAULTS[cls.model_type] == current, cls.__name__
    for cls in (transformers.RTDetrConfig, transformers.RTDetrV2Config, transformers.DFineConfig):
        backbone = {k: v for k, v in cls().backbone_config.to_dict().items() if k not in skip}
        assert DEFAULT_BACKBONE[cls.model_type] == backbone, cls.__name__


def test_a_foreign_or_broken_folder_is_one_clear_error(tmp_path, capsys):
    detr = tmp_path / "detr"
    detr.mkdir()
    (detr / "config.json").write_text(json.dumps({"architectures": ["DetrForObjectDetection"],
                                                  "id2label": {"0": "a"}}))
    with pytest.raises(ConversionError, match="DetrForObjectDetection is not an architecture"):
        from_transformers(detr)
    assert convert_main(["--from-transformers", str(detr), str(tmp_path / "o.pth")]) == 2
    assert capsys.readouterr().err.count("\n") == 1

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"architectures": ["RTDetrForObjectDetection"],
                                                    "id2label": {"0": "a"}}))
    (broken / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(64))
    with pytest.raises(ConversionError, match="model.safetensors: not a readable safetensors"):
        from_transformers(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ConversionError, match="config.json: not valid JSON"):
        from_transformers(broken)
    with pytest.raises(ConversionError, match="not a folder"):
        from_transformers(tmp_path / "missing")
