from dataclasses import dataclass, field
from typing import Literal

import pytest

from model.errors import ConfigError
from model.typed import load_config


@dataclass
class Inner:
    lr: float = 1e-3
    kind: Literal["adamw", "muon"] = "adamw"


@dataclass
class Outer:
    name: str = "x"
    steps: int = 10
    optim: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.steps < 0:
            raise ConfigError("steps: must be >= 0")


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_loads_nested_and_overrides(tmp_path):
    p = write(tmp_path, "steps: 5\noptim:\n  lr: 0.1\n")
    cfg = load_config(Outer, p, overrides=["optim.kind=muon", "tags=[a, b]"])
    assert cfg.steps == 5 and cfg.optim.lr == 0.1 and cfg.optim.kind == "muon" and cfg.tags == ["a", "b"]


@pytest.mark.parametrize(
    "text,needle",
    [
        ("stepz: 5\n", "stepz"),
        ("steps: five\n", "steps"),
        ("optim:\n  lr: [1]\n", "optim.lr"),
        ("optim:\n  kind: sgd\n", "optim.kind"),
        ("steps: -1\n", "steps"),
        ("steps: 5\n  bad: [\n", "line"),
    ],
)
def test_errors_name_key_and_file(tmp_path, text, needle):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(Outer, p)
    assert needle in str(e.value) and str(p) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_exponent_floats_without_dot(tmp_path):
    # PyYAML reads 1e-4 as a string (YAML 1.1); a float field still accepts it, other strings stay errors
    p = write(tmp_path, "optim:\n  lr: 1e-4\n")
    assert load_config(Outer, p).optim.lr == 1e-4
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(Outer, write(tmp_path, "optim:\n  lr: 1e-4x\n"))


@dataclass
class Renamed:
    RENAMED = {"old_lr": "lr"}
    lr: float = 1e-3


@dataclass
class HoldsRenamed:
    optim: Renamed = field(default_factory=Renamed)


def test_a_renamed_key_is_refused_with_its_new_name(tmp_path):
    with pytest.raises(ConfigError, match=r"key optim.old_lr is now optim.lr"):
        load_config(HoldsRenamed, write(tmp_path, "optim:\n  old_lr: 0.1\n"))
    assert load_config(HoldsRenamed, write(tmp_path, "optim:\n  lr: 0.1\n")).optim.lr == 0.1
