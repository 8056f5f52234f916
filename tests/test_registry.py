"""Registry: registration, building, keyword checking and suggestions."""

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
    with pytest.raises(ConfigError, match=r"model\.head\.type.*'Cnov'.*did you mean 'Conv'.*registered: Composite, Conv"):
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
