"""RTDETRHead / DFINEHead with weights converted from transformers equal RTDetrForObjectDetection,
RTDetrV2ForObjectDetection and DFineForObjectDetection (random weights, small configs, two
variants each) on the encoder outputs transformers computes for two real-looking 160x224 images:
eval-mode last layer, aux layers, encoder top-k; training mode with denoising (same noise by
re-seeding both sides) for every layer, the denoising part and D-FINE's corners / pre-bbox head."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch


def _load_fixtures():
    """The sibling helper module (the suite imports tests with --import-mode=importlib)."""
    if "hf_detr_fixtures" not in sys.modules:
        spec = importlib.util.spec_from_file_location("hf_detr_fixtures",
                                                      Path(__file__).with_name("hf_detr_fixtures.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["hf_detr_fixtures"] = module
        spec.loader.exec_module(module)
    return sys.modules["hf_detr_fixtures"]


_fx = _load_fixtures()
VARIANTS, bn_eval_train_mode, build_pair = _fx.VARIANTS, _fx.bn_eval_train_mode, _fx.build_pair
capture_encoder_outputs, max_abs, real_looking_images = (_fx.capture_encoder_outputs, _fx.max_abs,
                                                         _fx.real_looking_images)

TOL = 1e-4
MODULES = {"rt_detr": "transformers.models.rt_detr.modeling_rt_detr",
           "rt_detr_v2": "transformers.models.rt_detr_v2.modeling_rt_detr_v2",
           "d_fine": "transformers.models.d_fine.modeling_d_fine"}
TARGETS = [{"labels": torch.tensor([1, 4, 0]),
            "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2], [0.5, 0.5, 0.9, 0.8]])},
           {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.45, 0.55, 0.1, 0.15]])}]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_eval_outputs_equal_transformers(variant):
    model, config, head = build_pair(variant)
    with torch.no_grad():
        out, features = capture_encoder_outputs(model, real_looking_images())
        ours = head(features)
    assert ours["pred_logits"].shape == (2, config.num_queries, config.num_labels)
    assert out.logits.abs().max() > 1 and out.pred_boxes.std() > 0.1    # not a degenerate case
    assert max_abs(ours["pred_logits"], out.logits) < TOL
    assert max_abs(ours["pred_boxes"], out.pred_boxes) < TOL
    assert max_abs(ours["enc_aux_outputs"][0]["pred_logits"], out.enc_topk_logits) < TOL
    assert max_abs(ours["enc_aux_outputs"][0]["pred_boxes"], out.enc_topk_bboxes) < TOL
    assert len(ours["aux_outputs"]) == config.decoder_layers - 1
    if config.model_type != "d_fine":      # transformers' D-FINE reports only the last layer in eval
        for i, aux in enumerate(ours["aux_outputs"]):
            assert max_abs(aux["pred_logits"], out.intermediate_logits[:, i]) < TOL
            assert max_abs(aux["pred_boxes"], out.intermediate_reference_points[:, i]) < TOL


def _seeded_denoising(module_name, seed):
    """Patch transformers' denoising builder to re-seed the global generator right before it."""
    module = importlib.import_module(module_name)
    original = module.get_contrastive_denoising_training_group

    def seeded(*args, **kwargs):
        torch.manual_seed(seed)
        return original(*args, **kwargs)

    return module, original, seeded


def _train_outputs(variant, use_generator):
    model, config, head = build_pair(variant)
    bn_eval_train_mode(model)
    bn_eval_train_mode(head)
    module, original, seeded = _seeded_denoising(MODULES[config.model_type], 123)
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in TARGETS]
    module.get_contrastive_denoising_training_group = seeded
    try:
        features: dict = {}
        hook = model.model.encoder.register_forward_hook(
            lambda _m, _i, o: features.update(zip(["p3", "p4", "p5"], o.last_hidden_state)))
        with torch.no_grad():
            out = model.model(pixel_values=real_looking_images(), labels=labels)
            hook.remove()
            if use_generator:
                head.denoising_generator = torch.Generator().manual_seed(123)
                torch.manual_seed(999)        # the global generator must not matter then
            else:
                torch.manual_seed(123)
            ours = head(features, TARGETS)
    finally:
        module.get_contrastive_denoising_training_group = original
    return config, out, ours


@pytest.mark.parametrize("variant,use_generator", [(v, v.endswith("proj")) for v in VARIANTS])
def test_training_outputs_with_denoising_equal_transformers(variant, use_generator):
    config, out, ours = _train_outputs(variant, use_generator)
    meta = out.denoising_meta_values
    num_dn = meta["dn_num_split"][0]
    assert ours["dn_meta"]["dn_num_split"] == meta["dn_num_split"] == [num_dn, config.num_queries]
    assert ours["dn_meta"]["dn_num_group"] == meta["dn_num_group"]
    assert all(torch.equal(a, b) for a, b in zip(ours["dn_meta"]["dn_positive_idx"], meta["dn_positive_idx"]))
    first = 1 if config.model_type == "d_fine" else 0    # transformers' D-FINE puts the pre-bbox head first
    layers = ours["aux_outputs"] + [ours]
    assert len(ours["dn_outputs"]) == len(layers) == config.decoder_layers
    for i, (layer, dn) in enumerate(zip(layers, ours["dn_outputs"])):
        logits, boxes = out.intermediate_logits[:, i + first], out.intermediate_reference_points[:, i + first]
        assert max_abs(layer["pred_logits"], logits[:, num_dn:]) < TOL
        assert max_abs(layer["pred_boxes"], boxes[:, num_dn:]) < TOL
        assert max_abs(dn["pred_logits"], logits[:, :num_dn]) < TOL
        assert max_abs(dn["pred_boxes"], boxes[:, :num_dn]) < TOL
        if first:
            corners = torch.cat([dn["pred_corners"], layer["pred_corners"]], 1)
            assert max_abs(corners, out.intermediate_predicted_corners[:, i]) < TOL
            refs = torch.cat([dn["ref_points"], layer["ref_points"]], 1)
            assert max_abs(refs, out.initial_reference_points[:, i]) < TOL
    if first:
        pre_logits = torch.cat([ours["dn_pre_outputs"]["pred_logits"], ours["pre_outputs"]["pred_logits"]], 1)
        pre_boxes = torch.cat([ours["dn_pre_outputs"]["pred_boxes"], ours["pre_outputs"]["pred_boxes"]], 1)
        assert max_abs(pre_logits, out.intermediate_logits[:, 0]) < TOL
        assert max_abs(pre_boxes, out.intermediate_reference_points[:, 0]) < TOL
        assert torch.equal(ours["aux_outputs"][0]["teacher_corners"], ours["pred_corners"])
        assert torch.equal(ours["dn_outputs"][0]["teacher_logits"], ours["dn_outputs"][-1]["pred_logits"])


class _TileableEmbedding(torch.nn.Embedding):
    """transformers 5.25 calls ``weight_embedding.tile`` on the Embedding module itself (an
    AttributeError): give it the tensor method so that learn_initial_query can be compared."""

    def tile(self, *reps):
        return self.weight.tile(*reps)


def test_learned_initial_queries_equal_transformers(monkeypatch):
    monkeypatch.setitem(VARIANTS, "rtdetr_learned_query", ("rt_detr", dict(learn_initial_query=True)))
    model, _config, head = build_pair("rtdetr_learned_query")
    model.model.weight_embedding.__class__ = _TileableEmbedding
    assert head.query_embed is not None
    with torch.no_grad():
        out, features = capture_encoder_outputs(model, real_looking_images())
        ours = head(features)
    assert max_abs(ours["pred_logits"], out.logits) < TOL
    assert max_abs(ours["pred_boxes"], out.pred_boxes) < TOL
