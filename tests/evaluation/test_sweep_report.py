"""The sweep (grid, resume) and the report (table.md, PNG, summary.json), plus the CLI."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import yaml

from satfuse.cli import main
from satfuse.config import load_config
from satfuse.evaluation.report import make_report
from satfuse.evaluation.sweep import SweepConfig, load_sweep_config, plan_sweep, run_sweep
from satfuse.utils import SatfuseError
from tests.evaluation.helpers import make_export

ROOT = Path(__file__).resolve().parents[2]
BASE = {"data": {"crop": 24, "batch_size": 16, "min_epoch_samples": 32, "eval_batch_size": 64},
        "model": {"backbone": "tiny"}, "train": {"epochs": 2, "patience": 0, "lr": 3e-3, "backbone_lr": 3e-3}}


def _png_ok(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    assert mpimg.imread(path).shape[:2] == (h, w)
    return w, h


def test_sweep_runs_grid_resumes_and_reports(dfc_shards, tmp_path):
    export = make_export(tmp_path / "dual.pt")
    sweep = SweepConfig(
        out=str(tmp_path / "sweep"), base=BASE, checkpoint=str(export),
        train_shards=str(dfc_shards["train"]), test_shards=str(dfc_shards["test"]),
        methods=load_config(SweepConfig, None, [
            "methods=[{label: 'Dual-SimCLR (linear)', checkpoint: pretrained, mode: linear},"
            " {label: Supervised S1, modalities: s1}]"]).methods,
        label_fractions=[0.25, 1.0], multi_label_fractions=[1.0], seeds=[1, 2], tasks=["single", "multi"])
    dirs = run_sweep(sweep, progress=False)
    assert len(dirs) == 2 * 2 * 2 + 2 * 1 * 2
    results = [json.loads((d / "result.json").read_text()) for d in dirs]
    assert {(r["method"], r["task"], r["label_fraction"], r["seed"]) for r in results} == {
        (m, t, f, s) for m in ("Dual-SimCLR (linear)", "Supervised S1") for s in (1, 2)
        for t, fr in (("single", (0.25, 1.0)), ("multi", (1.0,))) for f in fr}
    # nested fractions through the whole pipeline: same seed -> 25 % set inside 100 % set
    small = next(r for r in results if r["label_fraction"] == 0.25 and r["seed"] == 1)
    assert small["n_train"] == sum(small["class_counts_train"]) == 24  # ceil(.25 * 10) per class
    mtimes = {d: (d / "result.json").stat().st_mtime_ns for d in dirs}
    run_sweep(sweep, progress=False)  # resumable: nothing reruns
    assert {d: (d / "result.json").stat().st_mtime_ns for d in dirs} == mtimes

    summary = make_report([tmp_path / "sweep"], tmp_path / "report")
    assert summary["n_runs"] == 12
    table = (tmp_path / "report" / "table.md").read_text()
    assert "## Single-label classification, 100 % of the labels" in table
    assert "## Multi-label classification, 100 % of the labels" in table
    assert "| Dual-SimCLR (linear) | 2 |" in table and "| Supervised S1 | 2 |" in table
    assert _png_ok(tmp_path / "report" / "label_fractions.png")[0] > 300
    _png_ok(tmp_path / "report" / "label_fractions_multi.png")
    saved = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert set(saved["results"]["single"]["Supervised S1"]) == {"0.25", "1"}


def _fake(path: Path, method: str, frac: float, seed: int, aa: float, task: str = "single") -> None:
    path.mkdir(parents=True)
    metrics = {"oa": aa + 0.1, "aa": aa, "f1_macro": aa - 0.1} if task == "single" else {
        "f1_macro": aa, "f1_micro": aa, "precision_macro": aa, "precision_micro": aa,
        "recall_macro": aa, "recall_micro": aa, "map": aa}
    (path / "result.json").write_text(json.dumps({"method": method, "task": task, "label_fraction": frac,
                                                  "seed": seed, "metrics": metrics, "n_train": 10}))


def test_report_mean_std_on_fake_results(tmp_path):
    _fake(tmp_path / "a1", "A", 1.0, 1, 0.5)
    _fake(tmp_path / "a2", "A", 1.0, 2, 0.7)
    _fake(tmp_path / "a3", "A", 0.1, 1, 0.3)
    _fake(tmp_path / "b1", "B", 1.0, 1, 0.4)
    summary = make_report([tmp_path / "a1", tmp_path / "a2", tmp_path / "a3", tmp_path / "b1" / "result.json"],
                          tmp_path / "rep")
    cell = summary["results"]["single"]["A"]["1"]["aa"]
    assert cell["mean"] == pytest.approx(0.6) and cell["std"] == pytest.approx(0.1414213, abs=1e-6)
    table = (tmp_path / "rep" / "table.md").read_text()
    assert "| A | 2 | 10 | 70.0 ± 14.1 | 60.0 ± 14.1 | 50.0 ± 14.1 |" in table
    assert "| B | 1 | 10 | 50.0 | 40.0 | 30.0 |" in table
    assert "| A | 60.0 ± 14.1 |" not in table  # fraction table is ordered 10 %, 100 %
    assert "| A | 30.0 | 60.0 ± 14.1 |" in table
    _png_ok(tmp_path / "rep" / "label_fractions.png")


def test_report_bad_inputs(tmp_path):
    with pytest.raises(SatfuseError, match="nope: run not found"):
        make_report([tmp_path / "nope"], tmp_path / "rep")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SatfuseError, match="no result.json"):
        make_report([tmp_path / "empty"], tmp_path / "rep")
    _fake(tmp_path / "x1", "A", 1.0, 1, 0.5)
    _fake(tmp_path / "x2", "A", 1.0, 1, 0.6)
    with pytest.raises(SatfuseError, match="repeated seeds"):
        make_report([tmp_path / "x1", tmp_path / "x2"], tmp_path / "rep")
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "rep")]) == 2


def test_shipped_configs_load_and_plan():
    for name in ("dfc2020.yaml", "demo.yaml"):
        from satfuse.evaluation.finetune import load_finetune_config

        load_finetune_config(str(ROOT / "hpc" / "finetune" / name))
    for name, n in (("demo_sweep.yaml", 6 * (5 * 2 + 1 * 2)), ("paper_sweep.yaml", 6 * 6 * 5 * 2)):
        cfg = load_sweep_config(str(ROOT / "hpc" / "finetune" / name), ["checkpoint=x.pt"])
        cfg.base_config = str(ROOT / "hpc" / "finetune" / Path(cfg.base_config).name)
        assert len(plan_sweep(cfg)) == n


def test_cli_finetune_flags_override_yaml_and_sweep_dry_run(dfc_shards, tmp_path, capsys):
    export = make_export(tmp_path / "dual.pt")
    rc = main(["finetune", "--config", str(ROOT / "hpc" / "finetune" / "demo.yaml"),
               "--checkpoint", str(export), "--mode", "linear", "--task", "single", "--label-fraction", "0.5",
               "--modalities", "s1s2", "--fusion", "late", "--seed", "3", "--run-dir", str(tmp_path / "one"),
               "--train-shards", str(dfc_shards["train"]), "--test-shards", str(dfc_shards["test"]),
               "data.crop=24", "train.epochs=1", "data.min_epoch_samples=16"])
    assert rc == 0
    res = json.loads((tmp_path / "one" / "result.json").read_text())
    assert (res["mode"], res["label_fraction"], res["seed"], res["config"]["data"]["crop"]) == ("linear", 0.5, 3, 24)
    assert main(["finetune", "--checkpoint", str(export), "--backbone", "resnet18",
                 "--run-dir", str(tmp_path / "bad"), "--train-shards", str(dfc_shards["train"]),
                 "--test-shards", str(dfc_shards["test"])]) == 2
    capsys.readouterr()
    rc = main(["finetune", "sweep", "--config", str(ROOT / "hpc" / "finetune" / "demo_sweep.yaml"),
               "--dry-run", "--out", str(tmp_path / "sw"), "checkpoint=x.pt",
               f"base_config={ROOT / 'hpc' / 'finetune' / 'demo.yaml'}"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    grid = yaml.safe_load((ROOT / "hpc" / "finetune" / "demo_sweep.yaml").read_text())
    expected = len(grid["methods"]) * len(grid["seeds"]) * (
        len(grid["label_fractions"]) + len(grid["multi_label_fractions"]))
    assert len(lines) == expected and all(line.startswith("todo\t") for line in lines)
    assert main(["finetune", "sweep", "--seed", "1", "--config", "x.yaml"]) == 2


def test_parallel_workers_give_the_same_results(dfc_shards, tmp_path):
    """workers=2 (spawned processes, what the demo uses) == workers=1, run for run."""
    def sweep(out: Path, workers: int) -> SweepConfig:
        return SweepConfig(out=str(out), base={**BASE, "train": {**BASE["train"], "epochs": 1}},
                           train_shards=str(dfc_shards["train"]), test_shards=str(dfc_shards["test"]),
                           methods=load_config(SweepConfig, None, ["methods=[{label: S1, modalities: s1}]"]).methods,
                           label_fractions=[0.5, 1.0], seeds=[3], tasks=["single"], workers=workers)
    serial = run_sweep(sweep(tmp_path / "serial", 1), progress=False)
    parallel = run_sweep(sweep(tmp_path / "parallel", 2), progress=False)
    for a, b in zip(serial, parallel, strict=True):
        ra, rb = (json.loads((d / "result.json").read_text()) for d in (a, b))
        assert ra["metrics"] == rb["metrics"] and ra["n_train"] == rb["n_train"]


def test_changed_config_is_refused_or_rerun_with_overwrite(dfc_shards, tmp_path):
    """A finished run is reused only when its recorded config equals the sweep's now: epochs
    1 -> 2 is refused naming the key (nothing runs), --overwrite reruns it, the same config again
    reruns nothing."""
    from dataclasses import replace

    from satfuse.evaluation.sweep import config_changes

    def sweep(epochs: int) -> SweepConfig:
        return SweepConfig(out=str(tmp_path / "sw"), base={**BASE, "train": {**BASE["train"], "epochs": epochs}},
                           train_shards=str(dfc_shards["train"]), test_shards=str(dfc_shards["test"]),
                           methods=load_config(SweepConfig, None, ["methods=[{label: S1, modalities: s1}]"]).methods,
                           label_fractions=[1.0], seeds=[3], tasks=["single"])
    (run,) = run_sweep(sweep(1), progress=False)
    first = (run / "result.json").stat().st_mtime_ns
    with pytest.raises(SatfuseError, match=r"sw: 1 finished run\(s\) were made with another config "
                                           r"\(train\.epochs: 1 -> 2; e\.g\. .*seed3\); rerun them with --overwrite"):
        run_sweep(sweep(2), progress=False)
    assert (run / "result.json").stat().st_mtime_ns == first
    assert config_changes(plan_sweep(sweep(2))[0]) == [("train.epochs", 1, 2)]
    (tmp_path / "x").mkdir()  # OUT spelled another way: the same runs, run_dir is not a difference
    assert config_changes(plan_sweep(replace(sweep(2), out=str(tmp_path / "x" / ".." / "sw")))[0]) == [
        ("train.epochs", 1, 2)]
    assert config_changes(plan_sweep(replace(sweep(1), out=str(tmp_path / "other")))[0]) is None
    run_sweep(sweep(2), progress=False, overwrite=True)
    res = json.loads((run / "result.json").read_text())
    assert res["config"]["train"]["epochs"] == 2 and res["curves"]["epoch"] == [1, 2]
    again = (run / "result.json").stat().st_mtime_ns
    run_sweep(sweep(2), progress=False, overwrite=True)  # unchanged: kept even with --overwrite
    assert (run / "result.json").stat().st_mtime_ns == again != first


def test_same_checkpoint_path_with_other_weights_is_a_change(dfc_shards, tmp_path, monkeypatch):
    """A finished run is reused only when made from the same weights, not merely the same path:
    re-exporting other weights to the checkpoint's path is refused naming the change (dry-run:
    changed), a result without the record is treated as changed, --overwrite reruns with the
    new identity; the weights are hashed once per sweep, not once per run."""
    from satfuse.checkpoint.export import weights_identity
    from satfuse.evaluation import sweep as sweep_mod

    export = make_export(tmp_path / "backbone.pt", seed=0)

    def sweep(seeds: list[int]) -> SweepConfig:
        return SweepConfig(out=str(tmp_path / "sw"), base={**BASE, "train": {**BASE["train"], "epochs": 1}},
                           checkpoint=str(export), train_shards=str(dfc_shards["train"]),
                           test_shards=str(dfc_shards["test"]), methods=load_config(SweepConfig, None, [
                               "methods=[{label: D, checkpoint: pretrained, mode: linear, modalities: s2}]"]).methods,
                           label_fractions=[1.0], seeds=seeds, tasks=["single"])
    first_id = weights_identity(export)
    (run,) = run_sweep(sweep([3]), progress=False)
    assert json.loads((run / "result.json").read_text())["checkpoint"]["weights"] == first_id
    mtime = (run / "result.json").stat().st_mtime_ns
    make_export(export, seed=0)  # the same weights exported again: reused
    run_sweep(sweep([3]), progress=False)
    assert (run / "result.json").stat().st_mtime_ns == mtime
    make_export(export, seed=1)  # retrained: other weights, same path
    new_id = weights_identity(export)
    assert new_id != first_id
    with pytest.raises(SatfuseError, match=rf"sw: 1 finished run\(s\) were made with another config \(model\.checkpoint "
                                           rf"\(weights\): '{first_id}' -> '{new_id}'; e\.g\. .*seed3\); rerun them with --overwrite"):
        run_sweep(sweep([3]), progress=False)
    assert (run / "result.json").stat().st_mtime_ns == mtime
    calls: list[str] = []
    monkeypatch.setattr(sweep_mod, "weights_identity", lambda p: calls.append(p) or weights_identity(p))
    planned = plan_sweep(sweep([3, 4, 5]))
    assert calls == [str(export)] and {r.weights for r in planned} == {new_id}
    assert sweep_mod.config_changes(planned[0]) == [("model.checkpoint (weights)", first_id, new_id)]
    res = json.loads((run / "result.json").read_text())
    del res["checkpoint"]["weights"]  # a result written before the weights were recorded
    (run / "result.json").write_text(json.dumps(res))
    make_export(export, seed=0)
    assert sweep_mod.config_changes(plan_sweep(sweep([3]))[0]) == [
        ("model.checkpoint (weights)", "(not recorded)", first_id)]
    run_sweep(sweep([3]), progress=False, overwrite=True)
    assert json.loads((run / "result.json").read_text())["checkpoint"]["weights"] == first_id


def test_every_export_writer_keeps_files_and_the_demo_reruns_sensibly(dfc_shards, tmp_path):
    """export_backbones and the torchvision writer called directly (as the demo and fine-tuning
    from a checkpoint dir do) refuse an existing output like `ckpt export`; the demo's deliberate
    re-export overwrites with the same bytes, so its sweep keeps its runs, and after retraining
    into the same backbone.pt the demo reruns them instead of reusing or refusing."""
    import torch

    from satfuse import demo
    from satfuse.checkpoint.export import export_backbones
    from satfuse.checkpoint.formats import export_torchvision
    from satfuse.checkpoint.manager import CheckpointManager
    from satfuse.checkpoint.state import ModelOptimState
    from satfuse.config import ModelConfig, PretrainConfig, to_dict
    from satfuse.models import build_pretrain_model

    out = tmp_path / "demo"
    cfg = PretrainConfig(model=ModelConfig(backbone="tiny", proj_hidden=32, proj_out=16))

    def train(step: int, seed: int) -> Path:
        torch.manual_seed(seed)
        return CheckpointManager(out / "runs" / "pretrain").save(
            step, {"model_optim": ModelOptimState(build_pretrain_model(cfg.model))}, {}, {"config": to_dict(cfg)})
    step = train(7, 0)
    mine = tmp_path / "mine.pt"
    mine.write_bytes(b"mine")
    (tmp_path / "tv.normalization.json").write_text("{}")
    with pytest.raises(SatfuseError, match=r"mine\.pt: exists; pass --overwrite to replace it"):
        export_backbones(step, mine)
    with pytest.raises(SatfuseError, match=r"tv\.normalization\.json: exists; pass --overwrite"):
        export_torchvision(step, tmp_path / "tv.pt")
    with pytest.raises(SatfuseError, match="inside .*which holds the checkpoints being exported"):
        export_backbones(step, step.parent / "b.pt", overwrite=True)
    assert mine.read_bytes() == b"mine" and not (tmp_path / "tv.pt").exists() and not (step.parent / "b.pt").exists()

    for name in ("dfc2020-train", "dfc2020-test"):
        (out / "shards").mkdir(exist_ok=True)
        (out / "shards" / name).symlink_to(dfc_shards[name.split("-")[1]])
    sweep_yaml = tmp_path / "sweep.yaml"
    sweep_yaml.write_text(yaml.safe_dump({
        "base": {**BASE, "train": {**BASE["train"], "epochs": 1}}, "label_fractions": [1.0], "seeds": [3],
        "tasks": ["single"], "methods": [{"label": "D", "checkpoint": "pretrained", "mode": "linear", "modalities": "s2"}]}))
    dcfg = demo.DemoConfig(out=str(out), finetune_config=str(sweep_yaml))
    from satfuse.checkpoint.export import weights_identity

    step_id = weights_identity(out / "runs" / "pretrain")  # a run dir: its latest step's meta.json
    assert step_id == weights_identity(step) and step_id.startswith("step_00000007/meta.json:sha256:")
    backbone = demo.export(step, out)
    (run,) = demo.finetune(dcfg, out, backbone)
    first = (run / "result.json").stat().st_mtime_ns
    weights = json.loads((run / "result.json").read_text())["checkpoint"]["weights"]
    assert demo.export(step, out) == backbone  # demo rerun: the same checkpoint exported again
    assert demo.finetune(dcfg, out, backbone) == [run] and (run / "result.json").stat().st_mtime_ns == first
    demo.export(train(7, 1), out)  # retrained (same step, other weights) into the same backbone.pt
    assert weights_identity(out / "runs" / "pretrain") != step_id
    demo.finetune(dcfg, out, backbone)
    res = json.loads((run / "result.json").read_text())
    assert (run / "result.json").stat().st_mtime_ns != first and res["checkpoint"]["weights"] != weights

    # the BigEarthNet-19 stage (packaged sweep, tiny sizes): its own synthetic reBEN tree and
    # official-split shard sets, the three methods, the linear probe on cached features, the
    # report's bigearthnet19 table; a rerun synthesises, packs and trains nothing again
    ben = yaml.safe_load((ROOT / "hpc" / "finetune" / "demo_bigearthnet19.yaml").read_text())
    ben.update(base_config=str(ROOT / "hpc" / "finetune" / "demo.yaml"), label_fractions=[1.0], workers=1,
               base={**ben["base"], "data": {**ben["base"]["data"], **BASE["data"]},
                     "train": {**ben["base"]["train"], "epochs": 1}})
    (tmp_path / "ben.yaml").write_text(yaml.safe_dump(ben))
    dcfg = demo.DemoConfig(out=str(out), finetune_config=str(sweep_yaml), ben_patches=24, ben_patch_size=24, ben_sweep_config=str(tmp_path / "ben.yaml"))
    ben_runs = demo.bigearthnet19(dcfg, out, backbone)
    manifests = {s: json.loads((out / "shards" / f"ben19-{s}" / "manifest.json").read_text()) for s in ("train", "val", "test")}
    assert {s: (m["dataset"], m["split"]) for s, m in manifests.items()} == {s: ("bigearthnet-v2", s) for s in manifests}
    results = {r["method"]: r for r in (json.loads((d / "result.json").read_text()) for d in ben_runs)}
    assert sorted(results) == ["Dual-SimCLR (fine-tune)", "Dual-SimCLR (linear)", "Supervised early fusion"]
    for r in results.values():
        assert r["benchmark"]["name"] == "bigearthnet19" and r["task"] == "multi" and 0 <= r["metrics"]["map"] <= 1
        assert (r["n_train"], r["n_val"], r["n_test"]) == tuple(manifests[s]["planned_pairs"] for s in ("train", "val", "test"))
    assert results["Dual-SimCLR (linear)"]["config"]["model"]["feature_cache"] == str(out / "runs" / "bigearthnet19" / "features")
    assert sorted(p.name.split("-")[0] for p in (out / "runs" / "bigearthnet19" / "features").glob("*.npz")) == ["test", "train", "val"]
    assert {k: results["Supervised early fusion"]["config"]["model"][k] for k in ("checkpoint", "fusion")} == {
        "checkpoint": "none", "fusion": "early"}
    stamps = {p: p.stat().st_mtime_ns for p in (*(d / "result.json" for d in ben_runs), *(out / "shards").glob("ben19-*/manifest.json"),
                                                  out / "raw" / "bigearthnet-v2" / "metadata.parquet")}
    assert demo.bigearthnet19(dcfg, out, backbone) == ben_runs
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    demo.report(dcfg, out, [*demo.finetune(dcfg, out, backbone), *ben_runs])
    table = (out / "reports" / "bigearthnet19" / "table.md").read_text()
    assert all(f"| {m} |" in table for m in results) and "mAP (macro)" in table
    assert (out / "reports" / "table.md").is_file()  # DFC2020's table where it was


def test_results_recorded_before_the_benchmark_key_count_as_dfc2020(tmp_path):
    """A result.json written before `data.benchmark` existed was a DFC2020 run: a sweep keeps it;
    one recorded for another benchmark is a change (nothing runs, nothing is read)."""
    import json

    from satfuse.config import to_dict
    from satfuse.evaluation.finetune import FinetuneConfig
    from satfuse.evaluation.sweep import PlannedRun, SweepMethod, config_changes

    run = PlannedRun(SweepMethod(label="m"), "single", 1.0, 0, tmp_path, FinetuneConfig())
    old = to_dict(run.cfg)
    del old["data"]["benchmark"]
    (tmp_path / "result.json").write_text(json.dumps({"config": old}))
    assert config_changes(run) == []
    old["data"]["benchmark"] = "other_bench"
    (tmp_path / "result.json").write_text(json.dumps({"config": old}))
    assert config_changes(run) == [("data.benchmark", "other_bench", "dfc2020")]
