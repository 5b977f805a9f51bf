"""The one config system: YAML -> dataclasses, strict keys, typed key=value overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from satfuse.config import ConfigError, PretrainConfig, dump_yaml, load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "hpc/pretrain").glob("*.yaml")))
def test_every_shipped_pretrain_config_loads(name: str) -> None:
    cfg = load_config(PretrainConfig, ROOT / "hpc/pretrain" / name)
    assert cfg.train.steps > 0
    assert cfg.model.method in {"dual_simclr", "simclr", "mma"}


def test_authors_defaults_in_dual_simclr_yaml() -> None:
    cfg = load_config(PretrainConfig, ROOT / "hpc/pretrain/dual_simclr.yaml")
    assert (cfg.model.backbone, cfg.model.proj_hidden, cfg.model.proj_out) == ("resnet50", 2048, 128)
    assert cfg.loss.temperature == pytest.approx(0.07)
    assert (cfg.optim.name, cfg.optim.lr, cfg.data.crop) == ("adam", 3e-5, 128)


def test_overrides_are_typed(tmp_path: Path) -> None:
    cfg = load_config(
        PretrainConfig, ROOT / "hpc/pretrain/tiny.yaml",
        ["train.steps=7", "optim.lr=1e-2", "train.precision=bf16", "data.s1_clip=[-30, 5]"],
    )
    assert cfg.train.steps == 7 and cfg.optim.lr == pytest.approx(1e-2)
    assert cfg.train.precision == "bf16" and cfg.data.s1_clip == [-30.0, 5.0]


def test_unknown_key_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.stepz"):
        load_config(PretrainConfig, None, ["train.stepz=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbone: resnet50\n  widht: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*model\.widht"):
        load_config(PretrainConfig, bad)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.steps=ten", "must be an integer"),
        ("train.precision=fp8", "not one of"),
        ("model.sync_bn=maybe", "true or false"),
        ("train=3", "must be a mapping"),
        ("nokey", "not key=value"),
    ],
)
def test_bad_values_fail_clearly(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, None, [override])


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(PretrainConfig, tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(PretrainConfig, broken)


def test_dump_roundtrip(tmp_path: Path) -> None:
    cfg = load_config(PretrainConfig, ROOT / "hpc/pretrain/demo.yaml", ["train.seed=5"])
    dump_yaml(cfg, tmp_path / "resolved.yaml")
    again = load_config(PretrainConfig, tmp_path / "resolved.yaml")
    assert again == cfg
