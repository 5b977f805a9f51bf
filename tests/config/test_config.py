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


def _float_keys(schema: type, prefix: str = "") -> list[tuple[str, bool]]:
    """(dotted key, is a list) of every float field of a schema, sections included."""
    import dataclasses
    from typing import get_args, get_origin, get_type_hints

    out: list[tuple[str, bool]] = []
    for name, tp in get_type_hints(schema).items():
        if dataclasses.is_dataclass(tp):
            out += _float_keys(tp, f"{prefix}{name}.")
        elif get_origin(tp) is list and float in get_args(tp):
            out.append((f"{prefix}{name}", True))
        elif tp is float or float in get_args(tp):
            out.append((f"{prefix}{name}", False))
    return out


def test_every_float_must_be_finite_and_overrides_blame_the_command_line(tmp_path: Path) -> None:
    """`optim.lr=.nan` used to reach torch, `loss.temperature=.inf` trained at a constant loss,
    `data.max_skipped_fraction=.nan` passed every range check: no float field takes NaN/inf.
    A bad override value names the command line, not the YAML file it is merged into."""
    import argparse

    from satfuse.evaluation.commands import finetune_config_from_args
    from satfuse.evaluation.finetune import FinetuneConfig

    keys = _float_keys(PretrainConfig)
    assert {"optim.lr", "loss.temperature", "data.max_skipped_fraction"} <= {k for k, _ in keys}
    assert ("optim.betas", True) in keys and len(keys) >= 11
    for schema, float_keys in ((PretrainConfig, keys), (FinetuneConfig, _float_keys(FinetuneConfig))):
        for key, listed in float_keys:
            for bad in (".nan", ".inf", "-.inf", "nan"):
                with pytest.raises(ConfigError, match=rf"^command line \(override .*{key}=(-?inf|nan) is not a finite"):
                    load_config(schema, None, [f"{key}={f'[{bad}]' if listed else bad}"])
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("loss:\n  temperature: .inf\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: loss\.temperature=inf is not a finite number"):
        load_config(PretrainConfig, yaml_file)
    for override in ("train.steps=ten", "optim.lr=.nan", "data={crop: x}"):
        with pytest.raises(ConfigError, match=r"^command line \(override") as raised:
            load_config(PretrainConfig, ROOT / "hpc/pretrain/tiny.yaml", [override])
        assert "tiny.yaml" not in str(raised.value)
    args = argparse.Namespace(config=str(ROOT / "hpc/finetune/dfc2020.yaml"))
    with pytest.raises(ConfigError, match=r"^command line \(override 'train.epochs=many'\)") as raised:
        finetune_config_from_args(args, ["train.epochs=many"])


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path: Path) -> None:
    """PyYAML keeps the last of two `train:` sections: the first one's settings vanished."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  steps: 3\ndata:\n  crop: 8\ntrain:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml: key 'train' is given twice \(lines 1 and 5\)"):
        load_config(PretrainConfig, twice)
    twice.write_text("optim:\n  lr: 0.1\n  name: adam\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"key 'lr' is given twice \(lines 2 and 4\)"):
        load_config(PretrainConfig, twice)
    twice.write_text("optim:\n  lr: 0.1\ntrain:\n  lr_note: {a: 1}\n")  # same name in two mappings: fine
    with pytest.raises(ConfigError, match="unknown key train.lr_note"):
        load_config(PretrainConfig, twice)
