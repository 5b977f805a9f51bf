"""Config names, `satfuse configs`, `satfuse init`, `demo --out`, the DeepSpeed extra, the version.

Every test runs from an empty working directory (no `hpc/` there), as a user of an installed
satfuse would; here the packaged files are the checkout's top-level folders.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from satfuse.cli import main
from satfuse.config import ConfigError, PretrainConfig, load_config
from satfuse.resources import ConfigNotFound, init_files, packaged_root, resolve_config
from satfuse.utils import SatfuseError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def empty_cwd(tmp_path, monkeypatch) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize(("spec", "kind", "expected"), [
    ("tiny", "pretrain", "hpc/pretrain/tiny.yaml"),
    ("dual_simclr.yaml", "pretrain", "hpc/pretrain/dual_simclr.yaml"),
    ("demo", "finetune", "hpc/finetune/demo.yaml"),
    ("finetune/demo_sweep", None, "hpc/finetune/demo_sweep.yaml"),
    ("zero1_bf16", "deepspeed", "hpc/deepspeed/zero1_bf16.json"),
    ("zero2_accum4", "deepspeed", "hpc/deepspeed/zero2_accum4.yaml"),
    ("example", "clusters", "hpc/clusters/example.yaml"),
    ("hpc/deepspeed/zero1_fp32.json", "deepspeed", "hpc/deepspeed/zero1_fp32.json"),  # the default
])
def test_names_and_repository_paths_resolve_from_any_directory(spec, kind, expected):
    assert resolve_config(spec, kind) == packaged_root() / expected


def test_a_name_that_is_neither_says_both_were_tried(empty_cwd):
    with pytest.raises(ConfigNotFound) as exc:
        resolve_config("dual_simclrr", "pretrain")
    msg = str(exc.value)
    assert str(empty_cwd / "dual_simclrr") in msg  # the path
    assert "no pretrain config named 'dual_simclrr'" in msg and "dual_simclr," in msg  # the names
    assert "satfuse configs" in msg
    assert isinstance(exc.value, ConfigError) and isinstance(exc.value, SatfuseError)
    with pytest.raises(ConfigNotFound, match="no packaged hpc/pretrain/nope.yaml"):
        resolve_config("hpc/pretrain/nope.yaml", "pretrain")


def test_a_name_shared_by_two_kinds_must_say_which():
    with pytest.raises(ConfigError, match=r"pretrain/demo, finetune/demo"):
        resolve_config("demo")
    assert resolve_config("pretrain/demo").parent.name == "pretrain"


def test_pretrain_config_by_name_with_deepspeed_by_name():
    cfg = load_config(PretrainConfig, "tiny_deepspeed", ["deepspeed.config=zero1_bf16"])
    assert cfg.model.backbone == "tiny" and cfg.train.engine == "deepspeed"
    from satfuse.engines.deepspeed_engine import read_ds_file, resolve_ds_config_path

    doc = read_ds_file(resolve_ds_config_path(cfg.deepspeed.config))
    assert doc["bf16"]["enabled"] is True


def test_cluster_profile_by_name_and_local_builtin():
    from satfuse.launch.cluster import load_profile

    profile, where = load_profile("example")
    assert profile.partition == "gpu" and Path(where) == packaged_root() / "hpc/clusters/example.yaml"
    with pytest.raises(SatfuseError, match="no clusters config named 'exampel'"):
        load_profile("exampel")


def test_finetune_sweep_by_name_finds_its_packaged_base_config():
    from satfuse.evaluation.sweep import load_sweep_config, plan_sweep

    sweep = load_sweep_config("demo_sweep", ["checkpoint=x.pt"])
    assert Path(sweep.base_config) == packaged_root() / "hpc/finetune/demo.yaml"
    assert plan_sweep(sweep)  # every run's config builds


def test_configs_lists_names_and_where_they_live(capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    for rel in ("hpc/pretrain/tiny.yaml", "hpc/deepspeed/zero1_bf16.json", "hpc/clusters/example.yaml",
                "slurm/pretrain.sbatch"):
        assert str(packaged_root() / rel) in out, rel


def test_init_writes_copies_refuses_to_overwrite_and_names_what_to_edit(empty_cwd, capsys):
    assert main(["init", "proj"]) == 0
    told = capsys.readouterr().out
    for word in ("example.yaml", "partition", "account", "SATFUSE_IFNAME"):
        assert word in told
    copies = {rel for _, rel in init_files()}
    assert {Path("hpc/clusters/example.yaml"), Path("hpc/pretrain/tiny.yaml"),
            Path("hpc/deepspeed/zero1_fp32.json"), Path("slurm/pretrain.sbatch")} <= copies
    for src, rel in init_files():
        assert (empty_cwd / "proj" / rel).read_bytes() == src.read_bytes()

    profile = empty_cwd / "proj" / "hpc/clusters/example.yaml"
    profile.write_text(profile.read_text().replace("partition: gpu", "partition: mine"))
    assert main(["init", "proj"]) == 2  # refused, one line, nothing touched
    assert "partition: mine" in profile.read_text()
    assert main(["init", "proj", "--force"]) == 0
    assert "partition: gpu" in profile.read_text()


def test_init_into_a_file_is_one_line_and_writes_nothing(empty_cwd, capfd):
    (empty_cwd / "notes").write_text("mine\n")
    for dest, said in (("notes", "notes: is an existing file"), ("notes/proj", "is inside notes, which is a file")):
        assert main(["init", dest]) == 2
        err = capfd.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (empty_cwd / "notes").read_text() == "mine\n" and sorted(p.name for p in empty_cwd.iterdir()) == ["notes"]


def test_project_copies_win_over_packaged_names(empty_cwd, capsys):
    from satfuse.resources import init_project

    init_project(empty_cwd)
    mine = empty_cwd / "hpc/pretrain/tiny.yaml"
    mine.write_text(mine.read_text().replace("steps: 20", "steps: 7"))
    assert load_config(PretrainConfig, "tiny").train.steps == 7
    assert main(["configs"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("tiny "))
    assert str(mine) in line and "project copy" in line


def test_deepspeed_config_without_deepspeed_is_refused_with_the_install_command(monkeypatch):
    from satfuse.engines.pretrain import run_pretrain

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed
    with pytest.raises(SatfuseError, match=r"pip install 'satfuse\[deepspeed\]'"):
        run_pretrain("tiny_deepspeed", ["train.steps=1"])


def test_version_is_single_sourced(capsys):
    import satfuse

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # no skip on any Python the project admits: the floor is the first Python with tomllib, and
    # ruff checks the code for the same Python
    assert project["project"]["requires-python"] == ">=3.11" and project["tool"]["ruff"]["target-version"] == "py311"
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "satfuse.__version__"}
    assert "deepspeed" not in " ".join(project["project"]["dependencies"])
    assert set(project["project"]["optional-dependencies"]) >= {"deepspeed", "dev"}
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"satfuse {satfuse.__version__}"


def test_demo_writes_only_under_out(empty_cwd, monkeypatch):
    """`satfuse demo --out DIR` (stages stubbed to record their paths): nothing in cwd but DIR."""
    import satfuse.demo as demo
    import satfuse.evaluation.curves as curves

    seen: list[Path] = []
    monkeypatch.setattr(demo, "synthesise", lambda cfg, out: seen.append(out))
    monkeypatch.setattr(demo, "make_shards", lambda cfg, out: seen.append(out))
    monkeypatch.setattr(demo, "pretrain", lambda cfg, out: seen.append(out) or out / "ckpt")
    monkeypatch.setattr(demo, "export", lambda ckpt, out: out / "backbone.pt")
    monkeypatch.setattr(demo, "finetune", lambda cfg, out, backbone: [])
    monkeypatch.setattr(demo, "segment", lambda cfg, out, backbone: [])
    monkeypatch.setattr(demo, "bigearthnet19", lambda cfg, out, backbone: seen.append(out) or [out / "ben19-run"])
    reported: list[list[Path]] = []

    def fake_report(runs, out):
        reported.append(list(runs))
        Path(out).mkdir(parents=True)
        (Path(out) / "table.md").write_text("| table |\n")
        return {}

    monkeypatch.setattr(curves, "make_report", fake_report)
    assert main(["demo", "--out", "elsewhere/d"]) == 0
    assert seen == [Path("elsewhere/d")] * 4
    assert Path("elsewhere/d/ben19-run") in reported[0]  # the BigEarthNet-19 runs reach the report
    assert (empty_cwd / "elsewhere/d/reports/table.md").is_file()
    assert (empty_cwd / "elsewhere/d/demo_timings.json").is_file()
    assert sorted(p.name for p in empty_cwd.iterdir()) == ["elsewhere"]

    assert main(["demo"]) == 0  # default: ./satfuse-demo
    assert sorted(p.name for p in empty_cwd.iterdir()) == ["elsewhere", "satfuse-demo"]
    assert (empty_cwd / "satfuse-demo/reports/table.md").is_file()


def test_local_launch_checks_the_config_once_before_starting_ranks(monkeypatch, sen12ms_shards):
    import subprocess

    started: list[list[str]] = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, **kw: started.append(cmd) or 0)
    assert main(["pretrain", "--config", "nope", "--nproc-per-node", "2"]) == 2
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    assert main(["pretrain", "--config", "tiny_deepspeed", "--nproc-per-node", "2"]) == 2
    assert started == []  # no torchrun for a config that cannot run
    assert main(["pretrain", "--config", "tiny", "--nproc-per-node", "2"]) == 2  # its shards are not here
    assert started == []
    assert main(["pretrain", "--config", "tiny", "--nproc-per-node", "2", f"data.shards={sen12ms_shards}"]) == 0
    assert started and "--config" in started[0] and "tiny" in started[0]
