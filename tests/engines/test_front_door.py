"""Pretraining as the README runs it (issue 21 items 5, 7, 8).

`--nproc-per-node` returns the ranks' own status (75 after a stop signal, 2 on bad input)
with one line and no torchrun traceback; `model.sync_bn=true` on CPU is refused at start;
rerunning a finished run says it is complete; metrics.jsonl names the rate as the console.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.engines.ranks import logs, metrics, run_ranks, wait_for_step
from tests.engines.test_pretrain import common

ROOT = Path(__file__).resolve().parents[2]


def _launch(overrides: list[str], out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "satfuse.cli", "pretrain", "--config", str(ROOT / "hpc/pretrain/tiny.yaml"),
           "--nproc-per-node", "2", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(out, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _rank_pids(launcher: subprocess.Popen) -> list[int]:
    pids = []
    for p in _descendants(launcher.pid):
        try:
            env = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(e.startswith(b"RANK=") for e in env) and b"satfuse.cli" in Path(f"/proc/{p}/cmdline").read_bytes():
            pids.append(p)
    return pids


def test_launcher_returns_75_when_the_ranks_saved_after_a_signal(sen12ms_shards, tmp_path):
    run, out = tmp_path / "run", tmp_path / "out.txt"
    proc = _launch(common(sen12ms_shards, run, 500, **{"checkpoint.every_steps": "1000"}), out)
    try:
        wait_for_step(run, 3, [proc])
        deadline = time.time() + 30
        while len(pids := _rank_pids(proc)) < 2 and time.time() < deadline:
            time.sleep(0.2)
        os.kill(pids[-1], signal.SIGUSR1)
        code = proc.wait(timeout=180)
    finally:
        proc.kill()
    text = out.read_text(errors="replace")
    assert code == 75, text
    assert "ChildFailedError" not in text and "Traceback" not in text, text
    assert (run / "checkpoints" / "latest").is_file()


def test_launcher_returns_2_and_the_ranks_error_line(sen12ms_shards, tmp_path):
    # a config error is caught before torchrun starts: one line, status 2
    out = tmp_path / "out.txt"
    proc = _launch([f"data.shards={tmp_path / 'missing'}", f"train.run_dir={tmp_path / 'run'}"], out)
    code = proc.wait(timeout=180)
    text = out.read_text(errors="replace")
    assert code == 2, text
    assert "ChildFailedError" not in text and "Traceback" not in text, text
    assert "shard not found" in text.splitlines()[-1], text
    # an error only a rank can see (sync_bn needs CUDA: known once the device is picked):
    # the launcher returns that rank's status and line, not torchrun's 1 and its traceback
    proc = _launch(common(sen12ms_shards, tmp_path / "run2", 3, **{"model.sync_bn": "true"}), out)
    code = proc.wait(timeout=180)
    text = out.read_text(errors="replace")
    assert code == 2, text
    assert "ChildFailedError" not in text and "Traceback" not in text, text
    assert "failed with exit status 2:" in text and "model.sync_bn=true needs CUDA" in text.splitlines()[-1], text


def test_sync_bn_on_cpu_is_refused_at_start(sen12ms_shards, tmp_path):
    codes = run_ranks(1, common(sen12ms_shards, tmp_path / "run", 3, **{"model.sync_bn": "true"}), tmp_path)
    assert codes == [2], logs(tmp_path)
    assert "model.sync_bn=true needs CUDA" in logs(tmp_path)


def test_rerun_of_a_finished_run_says_complete_and_metrics_name_pairs_per_s(sen12ms_shards, tmp_path):
    run = tmp_path / "run"
    assert run_ranks(1, common(sen12ms_shards, run, 3), tmp_path) == [0], logs(tmp_path)
    rows = [r for r in metrics(run) if "loss" in r]
    assert rows and all(r["pairs_per_s"] > 0 and "samples_per_s" not in r for r in rows)
    for f in tmp_path.glob("rank*.log"):
        f.unlink()
    assert run_ranks(1, common(sen12ms_shards, run, 3), tmp_path) == [0], logs(tmp_path)
    text = logs(tmp_path)
    assert "already complete" in text and "step 3 of train.steps=3" in text, text
    assert "loss nan" not in text
    assert len([r for r in metrics(run) if "loss" in r]) == len(rows)  # nothing trained again
