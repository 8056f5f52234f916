"""LWDETRHead (+ ViT + RFDETRProjector) equals transformers' LwDetr / RfDetr ForObjectDetection.

Each case builds a small transformers model from a config with random weights (perturbed so that
nothing sits at its init), saves it as the Hub serves it, converts the folder with
``tools/convert_weights.py --from-transformers`` and compares on a mixed batch of two real-looking
images of different sizes, padded by detkit (transformers sees the same padded, normalised batch
without a pixel mask, as detkit's DETRs see no mask either):

* raw outputs (logits, boxes) of the last decoder layer and the encoder proposals to 1e-4;
* the top-100 detections: transformers' ``post_process_object_detection`` at the padded size,
  clipped to each image, against detkit's ``predict``: scores 1e-4, boxes 0.1 px, labels;
* in training (dropout off, 13-like groups), the per-group outputs and the loss terms of
  transformers' LwDetr / RfDetr loss against detkit's SetCriterion (``iabce``, group matching).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from detkit.data.shapes import render_image  # noqa: E402
from detkit.inference import Predictor  # noqa: E402
from detkit.models.detr.criterion import SetCriterion  # noqa: E402

TOL = 1e-4


def convert_main(argv):
    path = Path(__file__).resolve().parents[3] / "tools" / "convert_weights.py"
    spec = importlib.util.spec_from_file_location("detkit_tools_convert_weights_lw", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def _decoder(**kw):
    base = dict(d_model=32, c2f_num_blocks=1, decoder_ffn_dim=64, decoder_self_attention_heads=4,
                decoder_cross_attention_heads=4, num_labels=5)
    return {**base, **kw}


def _rf(windows=2, **kw):
    backbone = dict(model_type="rf_detr_dinov2", hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                    image_size=56, num_windows=windows, out_indices=[1, 2, 4])
    return transformers.RfDetrConfig(backbone_config=backbone, **_decoder(**kw))


def _lw(scales, **kw):
    backbone = dict(model_type="lw_detr_vit", hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                    pretrain_image_size=64, image_size=64, num_windows=4, window_block_indices=[0],
                    out_indices=[1, 3])
    return transformers.LwDetrConfig(backbone_config=backbone, projector_scale_factors=scales,
                                     **_decoder(**kw))


# (config, the two image sizes (h, w)); RF-DETR's batches are square: transformers' windowed
# DINOv2 and detkit's ViT differ on non-square inputs (a backbone question, not the head's)
CASES = {
    "rfdetr_2layers_q20": (lambda: _rf(num_queries=20, group_detr=3, decoder_layers=2),
                           [(100, 84), (84, 112)]),
    "rfdetr_3layers_q30_pts2_nowindows": (
        lambda: _rf(windows=1, num_queries=30, group_detr=2, decoder_layers=3, decoder_n_points=2),
        [(112, 97), (70, 105)]),
    "lwdetr_p3p5_q25": (lambda: _lw([2.0, 0.5], num_queries=25, group_detr=3, decoder_layers=2),
                        [(90, 150), (128, 100)]),
    "lwdetr_p4_q15": (lambda: _lw([1.0], num_queries=15, group_detr=2, decoder_layers=3, decoder_n_points=3),
                      [(64, 130), (96, 70)]),
}


def _model(name):
    torch.manual_seed(0)
    config = CASES[name][0]()
    cls = (transformers.RfDetrForObjectDetection if config.model_type == "rf_detr"
           else transformers.LwDetrForObjectDetection)
    model = cls(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():   # move every weight off its init (zero deltas, unit norms ...)
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
    return model


def _images(sizes):
    """Two real-looking RGB images (uint8 HxWx3) with light noise (no exactly tied scores)."""
    import cv2

    rng = np.random.default_rng(0)
    out = []
    for i, (h, w) in enumerate(sizes):
        im = render_image(0, "val", 3 + 2 * i, size=128)[0]
        im = cv2.resize(im, (w, h)).astype(np.float32) + rng.normal(0, 3, (h, w, 3))
        out.append(np.clip(im, 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, tmp_path_factory):
    name = request.param
    hf_model = _model(name)
    folder = tmp_path_factory.mktemp(name)
    hf_model.save_pretrained(folder / "hf")
    transformers.RfDetrImageProcessor(size={"height": 112, "width": 112}).save_pretrained(folder / "hf")
    assert convert_main(["--from-transformers", str(folder / "hf"), str(folder / "out.pth")]) == 0
    predictor = Predictor(None, str(folder / "out.pth"), score_thr=0.0, device="cpu")
    images = _images(CASES[name][1])
    pixels = [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images]
    return hf_model, predictor.model.eval(), images, pixels


def test_outputs_and_detections_equal_transformers(converted):
    hf_model, model, images, pixels = converted
    batch = model.preprocess(pixels)
    assert batch.tensor.shape[-2:] != tuple(images[0].shape[:2])   # padding happened
    with torch.no_grad():
        ref = hf_model(pixel_values=batch.tensor)
        raw = model.head(model.features(batch))
        dets = model(pixels, [{"scale": (1.0, 1.0), "orig_size": im.shape[:2]} for im in images])
    torch.testing.assert_close(raw["pred_logits"], ref.logits, atol=TOL, rtol=TOL)
    torch.testing.assert_close(raw["pred_boxes"], ref.pred_boxes, atol=TOL, rtol=TOL)
    enc = raw["enc_aux_outputs"][0]
    torch.testing.assert_close(enc["pred_logits"], ref.enc_outputs_class, atol=TOL, rtol=TOL)
    torch.testing.assert_close(enc["pred_boxes"], ref.enc_outputs_coord_logits, atol=TOL, rtol=TOL)

    padded = [tuple(batch.tensor.shape[-2:])] * len(images)
    ref_dets = transformers.RfDetrImageProcessor().post_process_object_detection(
        ref, threshold=0.0, target_sizes=padded, top_k=100)
    for det, r, im in zip(dets, ref_dets, images):
        h, w = im.shape[:2]
        limit = torch.tensor([w, h, w, h], dtype=torch.float32)
        ref_boxes = torch.minimum(r["boxes"].clamp(min=0), limit)
        torch.testing.assert_close(det["scores"][:100], r["scores"][:100], atol=TOL, rtol=0)
        for score, label, box in zip(r["scores"][:100], r["labels"][:100], ref_boxes[:100]):
            same = ((det["scores"] - score).abs() <= TOL) & (det["labels"] == label)
            assert same.any(), (float(score), int(label))
            assert (det["boxes"][same] - box).abs().max(dim=1).values.min() <= 0.1, box


def _no_dropout(hf_model, model):
    hf_model.config.dropout = 0.0
    for layer in hf_model.model.decoder.layers:
        layer.dropout = 0.0
        layer.mlp.dropout = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def _targets():
    hf = [{"class_labels": torch.tensor([1, 3, 3]),
           "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.3, 0.2], [0.7, 0.7, 0.1, 0.15]])},
          {"class_labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    return hf, [{"labels": t["class_labels"], "boxes": t["boxes"]} for t in hf]


def test_training_outputs_and_loss_equal_transformers(converted):
    hf_model, model, _, pixels = converted
    batch = model.preprocess(pixels)
    _no_dropout(hf_model, model)
    hf_model.train()
    model.train()
    try:
        hf_targets, targets = _targets()
        ref = hf_model(pixel_values=batch.tensor, labels=hf_targets)
        raw = model.head(model.features(batch))
    finally:
        hf_model.eval()
        model.eval()
    groups = hf_model.config.group_detr
    assert raw["num_groups"] == groups and raw["pred_logits"].shape[1] == groups * hf_model.config.num_queries
    torch.testing.assert_close(raw["pred_logits"], ref.logits, atol=TOL, rtol=TOL)
    torch.testing.assert_close(raw["pred_boxes"], ref.pred_boxes, atol=TOL, rtol=TOL)
    criterion = SetCriterion(num_classes=5, class_loss="iabce", alpha=0.25, clamp_boxes=False,
                             per_layer_keys=True)
    ours = criterion(raw, targets)
    layers = hf_model.config.decoder_layers
    for term, theirs_key, weight in (("iabce", "loss_ce", 1.0), ("bbox", "loss_bbox", 5.0),
                                     ("giou", "loss_giou", 2.0)):
        expected = {"": ref.loss_dict[theirs_key], "_enc_0": ref.loss_dict[theirs_key + "_enc"]}
        expected.update({f"_aux_{i}": ref.loss_dict[f"{theirs_key}_{i}"] for i in range(layers - 1)})
        for suffix, value in expected.items():
            torch.testing.assert_close(ours[f"loss_{term}{suffix}"], weight * value, atol=1e-5, rtol=1e-4)


def test_in_memory_transformers_names_convert_like_the_saved_folder(converted):
    """``save_pretrained`` writes RF-DETR's original key names; the in-memory state dict has
    transformers' (``model.decoder.layers.0.self_attn.q_proj`` ...): both give the same tensors."""
    from detkit.models.convert.hf_lwdetr import convert_lwdetr_state_dict
    from detkit.models.convert.transformers import HFConfig

    hf_model, model, _, _ = converted
    config = HFConfig(hf_model.config.to_dict())
    ours = convert_lwdetr_state_dict(hf_model.state_dict(), config)
    expected = model.state_dict()
    def names(keys):
        return {k for k in keys if not k.endswith("num_batches_tracked")}

    assert names(ours) == names(expected)
    for key in names(ours):
        torch.testing.assert_close(ours[key], expected[key], atol=0, rtol=0)


def test_head_converter_is_strict():
    from detkit.models.convert.hf_lwdetr import convert_lwdetr_head
    from detkit.models.convert.transformers import HFConfig

    hf_model = _model("lwdetr_p4_q15")
    config = HFConfig(hf_model.config.to_dict())
    state = dict(hf_model.state_dict())
    assert len(convert_lwdetr_head(state, config)) > 0
    with pytest.raises(ValueError, match="unexpected decoder keys.*model.decoder.extra"):
        convert_lwdetr_head({**state, "model.decoder.extra.weight": torch.zeros(1)}, config)
    missing = {k: v for k, v in state.items() if not k.startswith("model.enc_output_norm.1.")}
    with pytest.raises(ValueError, match="no tensors for.*enc_output_norm.1"):
        convert_lwdetr_head(missing, config)
    with pytest.raises(ValueError, match="do not fit"):
        convert_lwdetr_head(state, HFConfig({**config, "group_detr": 1}))
