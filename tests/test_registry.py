"""Registry: registration, building, keyword checking and suggestions."""

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytest

from detkit.registry import ConfigError, Registry


@pytest.fixture
def reg():
    reg = Registry("widget")

    @reg.register()
    class Conv:
        def __init__(self, *, in_channels: int, num_classes: int = 3):
            self.in_channels = in_channels
            self.num_classes = num_classes

    @reg.register("Composite")
    class Composite:
        def __init__(self, child):
            self.child = child

        @classmethod
        def from_config(cls, cfg, *, path, **extra):
            return cls(reg.build(cfg["child"], f"{path}.child", **extra))

    return reg


def test_build_and_extra(reg):
    obj = reg.build({"type": "Conv", "num_classes": 5}, "model.head", in_channels=8)
    assert (obj.in_channels, obj.num_classes) == (8, 5)
    comp = reg.build({"type": "Composite", "child": {"type": "Conv"}}, "m", in_channels=2)
    assert comp.child.in_channels == 2


def test_duplicate_name_is_error(reg):
    with pytest.raises(KeyError, match="already registered"):
        @reg.register("Conv")
        class Other:  # noqa: F841
            pass


def test_unknown_type_lists_and_suggests(reg):
    with pytest.raises(ConfigError,
                       match=r"model\.head\.type.*'Cnov'.*did you mean 'Conv'.*registered: Composite, Conv"):
        reg.build({"type": "Cnov"}, "model.head")


def test_typo_keyword_is_error_not_ignored(reg):
    with pytest.raises(ConfigError, match=r"model\.head\.num_clases.*did you mean 'num_classes'"):
        reg.build({"type": "Conv", "in_channels": 3, "num_clases": 4}, "model.head")


def test_missing_required_and_type(reg):
    with pytest.raises(ConfigError, match="needs the argument 'in_channels'"):
        reg.build({"type": "Conv"}, "m")
    with pytest.raises(ConfigError, match="missing 'type'"):
        reg.build({"in_channels": 3}, "m")
    with pytest.raises(ConfigError, match="expected a mapping"):
        reg.build(["Conv"], "m")


def test_extra_given_twice_is_error(reg):
    with pytest.raises(ConfigError, match=r"m\.in_channels: set by detkit"):
        reg.build({"type": "Conv", "in_channels": 3}, "m", in_channels=4)


def test_global_registries_are_populated():
    import detkit.models  # noqa: F401
    from detkit.registry import DETECTORS
    assert "OneStageDetector" in DETECTORS


def test_kwargs_checked_through_subclass_kwargs():
    reg = Registry("x")

    class Base:
        def __init__(self, *, alpha: float = 1.0, beta: float = 2.0):
            self.alpha, self.beta = alpha, beta

    @reg.register()
    class Child(Base):
        def __init__(self, *, gamma: int = 0, **kwargs):
            super().__init__(**kwargs)
            self.gamma = gamma

    obj = reg.build({"type": "Child", "gamma": 3, "beta": 5.0}, "m")
    assert (obj.gamma, obj.alpha, obj.beta) == (3, 1.0, 5.0)
    with pytest.raises(ConfigError, match=r"m\.betta.*did you mean 'beta'"):
        reg.build({"type": "Child", "betta": 5.0}, "m")


@pytest.mark.slow
def test_registries_load_detkits_own_parts_on_first_use():
    # a fresh interpreter: nothing but detkit.registry imported, then a build by name
    import subprocess
    import sys

    code = ("import sys\n"
            "from detkit.registry import BACKBONES, DATASETS, EVALUATORS\n"
            "assert 'detkit.models' not in sys.modules\n"
            "net = BACKBONES.build({'type': 'ResNet', 'depth': 18}, 'model.backbone')\n"
            "print(type(net).__name__, 'VOCEvaluator' in EVALUATORS, 'CocoDetection' in DATASETS.names())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ResNet", "True", "True"]


@pytest.mark.parametrize("key,value,expected", [
    ("output_stride", [16], r"model\.backbone\.output_stride: expected int \| None, got \[16\] \(list\)"),
    ("dilation", 2, r"model\.backbone\.dilation: expected dict \| None, got 2 \(int\)"),
    ("out_features", "c5", r"model\.backbone\.out_features: expected Sequence\[str\], got 'c5'"),
    ("frozen_stages", 1.5, r"model\.backbone\.frozen_stages: expected int, got 1\.5 \(float\)"),
])
def test_wrong_value_type_names_the_key(key, value, expected):
    from detkit.registry import BACKBONES
    with pytest.raises(ConfigError, match=expected):
        BACKBONES.build({"type": "ResNet", "depth": 18, key: value}, "model.backbone")


def test_value_types_from_annotations(reg):
    @reg.register()
    class Typed:
        def __init__(self, *, ratios: Sequence[float] = (1.0,), size: tuple[int, int] = (1, 1),
                     table: Mapping[str, int] | None = None, flag: bool = False, scale: float = 1.0,
                     anything: Any = None):
            self.ratios = ratios

    ok = reg.build({"type": "Typed", "ratios": [1, 2.5], "size": [3, 4], "table": {"a": 1},
                    "flag": True, "scale": 2, "anything": object()}, "m")
    assert ok.ratios == [1, 2.5]   # an int is a valid float, a list a valid tuple
    for key, value in (("ratios", [1, "x"]), ("size", 3), ("table", [1]), ("flag", 1), ("scale", True)):
        with pytest.raises(ConfigError, match=rf"m\.{key}: expected"):
            reg.build({"type": "Typed", key: value}, "m")
