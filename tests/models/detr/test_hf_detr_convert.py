"""convert/hf_detr.py: the head config from a config.json mapping, strict key conversion."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from detkit.models.convert.hf_detr import convert_head, head_config, is_head_key


def _fixtures():
    if "hf_detr_fixtures" not in sys.modules:
        spec = importlib.util.spec_from_file_location("hf_detr_fixtures",
                                                      Path(__file__).with_name("hf_detr_fixtures.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["hf_detr_fixtures"] = module
        spec.loader.exec_module(module)
    return sys.modules["hf_detr_fixtures"]


@pytest.fixture(scope="module")
def dfine():
    model, config, head = _fixtures().build_pair("dfine_bins16_proj")
    return model.state_dict(), config, head


def test_head_config_from_a_sparse_config_json_uses_transformers_defaults():
    node = head_config({"model_type": "rt_detr_v2", "d_model": 128, "decoder_method": "discrete"})
    assert node["type"] == "RTDETRHead" and node["hidden_dim"] == 128
    assert node["sampling_method"] == "discrete"
    assert node["num_queries"] == 300 and node["num_points"] == 4 and node["offset_scale"] == 0.5
    node = head_config({"model_type": "d_fine", "decoder_n_points": [3, 6, 3], "max_num_bins": 16})
    assert node["type"] == "DFINEHead" and node["num_points"] == [3, 6, 3] and node["reg_max"] == 16
    assert "num_classes" not in node        # the detector passes it


@pytest.mark.parametrize("config,match", [
    ({"model_type": "detr"}, "model_type"),
    ({"model_type": "d_fine", "eval_idx": 2, "decoder_layers": 6}, "eval_idx"),
    ({"model_type": "rt_detr_v2", "num_feature_levels": 4, "decoder_n_levels": 3}, "decoder_n_levels"),
])
def test_unsupported_configs_are_clear_errors(config, match):
    with pytest.raises(ValueError, match=match):
        head_config(config)


def test_every_head_key_is_converted_once_and_fills_the_head(dfine):
    state, config, head = dfine
    out = convert_head(state, config)
    assert all(k.startswith("head.") for k in out)
    assert sorted(k[5:] for k in out) == sorted(head.state_dict())
    assert not any(is_head_key(k) for k in state if k.startswith(("model.backbone.", "model.encoder")))


def test_a_checkpoint_with_only_the_tied_aliases_converts_the_same(dfine):
    state, config, _ = dfine
    full = convert_head(state, config)
    aliased = {k: v for k, v in state.items() if not k.startswith(("model.decoder.class_embed.",
                                                                    "model.decoder.bbox_embed."))}
    assert convert_head(aliased, config).keys() == full.keys()


def test_unknown_keys_and_inconsistent_point_scales_are_errors(dfine):
    state, config, _ = dfine
    with pytest.raises(KeyError, match="model.decoder.layers.0.extra_thing.weight"):
        convert_head({**state, "model.decoder.layers.0.extra_thing.weight": torch.zeros(1)}, config)
    bad = dict(state)
    key = "model.decoder.layers.1.encoder_attn.num_points_scale"
    bad[key] = torch.ones_like(state[key])
    with pytest.raises(ValueError, match="decoder_n_points"):
        convert_head(bad, config)
    renamed = {k.replace("class_embed.1.", "class_embed.7."): v for k, v in state.items()}
    with pytest.raises(Exception, match="class_heads.7|class_embed.7"):
        head = _fixtures().build_pair("dfine_bins16_proj")[2]
        head.load_state_dict({k[5:]: v for k, v in convert_head(renamed, config).items()}, strict=True)


@pytest.mark.parametrize("variant", ["rtdetr_3lvl", "dfine_bins8"])
def test_hub_checkpoints_with_the_pre_5_0_names_convert_the_same(variant):
    """Hub files keep transformers 4's ``self_attn.out_proj`` and ``layers.N.fc1`` / ``fc2``."""
    model, config, _ = _fixtures().build_pair(variant)
    state = model.state_dict()
    old = {}
    for key, value in state.items():
        key = key.replace("self_attn.o_proj.", "self_attn.out_proj.")
        for new, legacy in (("mlp.fc1.", "fc1."), ("mlp.fc2.", "fc2."), ("mlp.layers.0.", "fc1."),
                            ("mlp.layers.1.", "fc2.")):
            if key.startswith("model.decoder.layers."):
                key = key.replace(new, legacy)
        old[key] = value
    assert old.keys() != state.keys()
    ours, ref = convert_head(old, config), convert_head(state, config)
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
