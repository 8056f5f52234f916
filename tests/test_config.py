"""Config loading: _base_ merge, overrides, round trip, and every error the issue names."""

import textwrap

import pytest
import yaml

from detkit.config import ConfigError, apply_overrides, dump_config, get_path, load_config, merge


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def cfg_tree(tmp_path):
    write(tmp_path / "_base_" / "model.yaml", """
        model:
          type: OneStageDetector
          num_classes: 80
          backbone: {type: ResNet, depth: 50, out_features: [c3, c4, c5]}
        train: {lr: 0.1, max_iters: 100}
    """)
    write(tmp_path / "_base_" / "data.yaml", """
        _base_: [model.yaml]
        data: {root: data/coco, train: {batch_size: 2}}
        train: {lr: 0.05}
    """)
    return write(tmp_path / "exp" / "cfg.yaml", """
        _base_: [../_base_/data.yaml]
        model:
          num_classes: 4
          backbone: {depth: 18}
        data: {train: {batch_size: 16}}
    """)


def test_base_merge_is_deep_and_ordered(cfg_tree):
    cfg = load_config(cfg_tree)
    assert cfg["model"]["num_classes"] == 4
    assert cfg["model"]["backbone"] == {"type": "ResNet", "depth": 18, "out_features": ["c3", "c4", "c5"]}
    assert cfg["train"] == {"lr": 0.05, "max_iters": 100}  # middle file overrides the deepest base
    assert cfg["data"] == {"root": "data/coco", "train": {"batch_size": 16}}
    assert "_base_" not in cfg


def test_overrides_parse_yaml_scalars(cfg_tree):
    cfg = load_config(cfg_tree, ["train.lr=0.01", "model.backbone.depth=34", "data.root=/x/y",
                                 "model.backbone.out_features=[c5]", "train.max_iters=null"])
    assert cfg["train"]["lr"] == 0.01 and isinstance(cfg["train"]["lr"], float)
    assert cfg["model"]["backbone"]["depth"] == 34
    assert cfg["data"]["root"] == "/x/y"
    assert cfg["model"]["backbone"]["out_features"] == ["c5"]
    assert cfg["train"]["max_iters"] is None


def test_override_list_index_and_new_key_in_typed_node(cfg_tree):
    cfg = load_config(cfg_tree, ["model.backbone.out_features.0=c2", "model.backbone.norm=FrozenBN"])
    assert cfg["model"]["backbone"]["out_features"] == ["c2", "c4", "c5"]
    assert cfg["model"]["backbone"]["norm"] == "FrozenBN"  # checked later by the registry


def test_override_typo_suggests(cfg_tree):
    with pytest.raises(ConfigError, match=r"train\.lrr.*did you mean 'lr'"):
        load_config(cfg_tree, ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"modle.*did you mean 'model'"):
        load_config(cfg_tree, ["modle.num_classes=3"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(cfg_tree, ["train.lr"])
    with pytest.raises(ConfigError, match="not a valid index"):
        load_config(cfg_tree, ["model.backbone.out_features.7=c2"])


def test_round_trip(cfg_tree, tmp_path):
    cfg = load_config(cfg_tree, ["train.lr=1e-3"])
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    assert load_config(out) == cfg


def test_python_tag_refused(tmp_path):
    path = write(tmp_path / "evil.yaml", "a: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="tag"):
        load_config(path)


def test_missing_base_names_path(tmp_path):
    path = write(tmp_path / "c.yaml", "_base_: [nope/base.yaml]\nx: 1\n")
    with pytest.raises(ConfigError, match=r"nope/base\.yaml"):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = write(tmp_path / "bad.yaml", "a: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    lst = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)


def test_base_any_depth_and_absolute_paths(tmp_path):
    # Four levels: d -> c (absolute path, another folder) -> b -> a; each level overrides one key.
    write(tmp_path / "a.yaml", "x: 1\ny: 1\nz: 1\nw: {p: 1, q: 1}\n")
    write(tmp_path / "b.yaml", "_base_: [a.yaml]\ny: 2\nw: {p: 2}\n")
    write(tmp_path / "sub" / "c.yaml", f"_base_: [{tmp_path / 'b.yaml'}]\nz: 3\n")
    write(tmp_path / "d.yaml", "_base_: [sub/c.yaml]\nw: {q: 4}\n")
    assert load_config(tmp_path / "d.yaml") == {"x": 1, "y": 2, "z": 3, "w": {"p": 2, "q": 4}}


def test_base_cycle_names_the_chain(tmp_path):
    write(tmp_path / "a.yaml", "_base_: [c.yaml]\nx: 1\n")
    write(tmp_path / "b.yaml", "_base_: [a.yaml]\n")
    write(tmp_path / "c.yaml", "_base_: [b.yaml]\n")
    write(tmp_path / "top.yaml", "_base_: [a.yaml]\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "top.yaml")
    chain = " -> ".join(str(tmp_path / f) for f in ("a.yaml", "c.yaml", "b.yaml", "a.yaml"))
    assert str(info.value) == f"_base_ cycle: {chain}"
    write(tmp_path / "self.yaml", "_base_: [self.yaml]\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "self.yaml")


def test_missing_base_names_who_inherits_it(tmp_path):
    write(tmp_path / "a.yaml", "_base_: [gone.yaml]\n")
    write(tmp_path / "b.yaml", "_base_: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"(?s)gone\.yaml.*inherited by .*b\.yaml"):
        load_config(tmp_path / "b.yaml")


def test_delete_replaces_mapping():
    base = {"opt": {"type": "SGD", "momentum": 0.9, "lr": 0.1}}
    out = merge(base, {"opt": {"_delete_": True, "type": "AdamW", "lr": 1e-3}})
    assert out == {"opt": {"type": "AdamW", "lr": 1e-3}}
    assert base["opt"]["momentum"] == 0.9  # merge never mutates its inputs


def test_get_path():
    cfg = {"a": {"b": {"c": 3}}}
    assert get_path(cfg, "a.b.c") == 3
    assert get_path(cfg, "a.x", default=None) is None
    with pytest.raises(ConfigError, match=r"'a\.x'"):
        get_path(cfg, "a.x")


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError):
        apply_overrides({"a": 1}, ["b=2"])


def test_every_shipped_config_loads():
    """Each YAML under configs/ resolves (bases found, YAML valid, no python tags)."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(p for p in root.rglob("*.yaml") if "_base_" not in p.parts)
    for path in files:
        cfg = load_config(path)
        assert isinstance(cfg, dict) and cfg, path
        yaml.safe_dump(cfg)


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads ``1e-4`` as a string, which reached the optimizer as lr='1e-4' and
    failed there with "'<' not supported between 'str' and 'float'"; files and --set read it as YAML 1.2."""
    path = write(tmp_path / "c.yaml", """
        train: {optimizer: {lr: 1e-4, weight_decay: 5E-2}, max_iters: 10, eps: .5e1, name: "1e-4"}
    """)
    cfg = load_config(path)
    assert cfg["train"]["optimizer"] == {"lr": 1e-4, "weight_decay": 0.05}
    assert cfg["train"]["eps"] == 5.0 and cfg["train"]["name"] == "1e-4"   # quoted stays a string
    assert apply_overrides(cfg, ["train.optimizer.lr=2e-3"])["train"]["optimizer"]["lr"] == 2e-3


# ---------------------------------------------------------------- issue 29: --set like a file
def test_set_mapping_with_delete_replaces_as_in_a_file(cfg_tree):
    """``_delete_: true`` inside ``--set`` replaces the mapping (it used to be passed on as a key
    and fail in the builder); without it a mapping merges, as the same YAML in a file does."""
    cfg = load_config(cfg_tree, ["model.backbone={_delete_: true, type: DarkNet, depth: 53}"])
    assert cfg["model"]["backbone"] == {"type": "DarkNet", "depth": 53}
    merged = load_config(cfg_tree, ["model.backbone={depth: 34, frozen_stages: 1}"])
    assert merged["model"]["backbone"] == {"type": "ResNet", "depth": 34, "out_features": ["c3", "c4", "c5"],
                                           "frozen_stages": 1}
    file_cfg = write(cfg_tree.parent / "same.yaml", """
        _base_: [cfg.yaml]
        model: {backbone: {_delete_: true, type: DarkNet, depth: 53}}
    """)
    assert load_config(file_cfg)["model"] == cfg["model"]


def test_delete_keys_never_reach_the_result(tmp_path):
    """A ``_delete_`` where nothing was inherited, or nested in a replaced mapping, is dropped too."""
    path = write(tmp_path / "c.yaml", """
        data: {train: {dataset: {_delete_: true, type: CocoDetection, inner: {_delete_: true, a: 1}}}}
    """)
    assert load_config(path)["data"]["train"]["dataset"] == {"type": "CocoDetection", "inner": {"a": 1}}
    over = load_config(path, ["data.train={dataset: {_delete_: true, type: YoloDetection}}"])
    assert over["data"]["train"] == {"dataset": {"type": "YoloDetection"}}


def test_nested_typo_of_a_detector_key_is_suggested():
    """``--set model.num_clases=3``: the detector consumes num_classes itself, so the generic
    keyword check did not know it and gave no suggestion."""
    from detkit.models import build_model
    cfg = load_config("configs/centernet/centernet_r18_shapes.yaml",
                      ["model.backbone.weights=null", "model.num_clases=3"])
    with pytest.raises(ConfigError, match=r"model\.num_clases.*did you mean 'num_classes'"):
        build_model(cfg["model"])
    cfg = load_config("configs/faster_rcnn/faster_rcnn_r18_fpn_shapes.yaml",
                      ["model.backbone.weights=null", "model.roi_heda={}"])
    with pytest.raises(ConfigError, match=r"model\.roi_heda.*did you mean 'roi_head'"):
        build_model(cfg["model"])
