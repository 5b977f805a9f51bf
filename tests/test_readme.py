"""Every ```bash block of README.md and slurm/README.md, run as written, scaled down in size.

A new user follows the README literally; this test does the same, in a fresh directory, in
order, with sizes scaled down by one variable, `SATFUSE_README_SCALE` (default 0.0001; at 1
every command runs exactly as written). Each count in a command is multiplied by the scale
and kept at or above a small floor (scenes 2, patches per scene 16, DFC2020 patches 48/32,
batch 4 per rank, steps 6, epochs 1, one seed and one label fraction of a sweep); below 1 the
patches are 32 px, crops 32/24 px and the backbone the `tiny` ResNet instead of ResNet-50
(ResNet-50 is sized for GPUs). Commands that need a SLURM cluster (submit to a real cluster,
jobs, sbatch, the local cluster's scripts, which need root) and `make test` (this suite) are
listed as skipped with the test that covers them; `--cluster local` runs, with `--wait` so no
job outlives the test.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCALE = float(os.environ.get("SATFUSE_README_SCALE", "0.0001"))

# (why a command is not run here, which test runs it instead)
SKIPS: list[tuple[str, str]] = [
    (r"^make test\b", "the test suite itself"),
    (r"^make demo\b", "set-up + `satfuse demo` at full size (11 min); its stages are the pipeline run here"),
    (r"^satfuse submit (?!.*--cluster local(\s|$))", "needs a SLURM cluster (tests/slurm)"),
    (r"^satfuse jobs\b", "needs a submitted job (tests/slurm)"),
    (r"^(jid=\$\()?sbatch\b", "needs a SLURM cluster (tests/slurm)"),
    (r"^slurm/local-cluster/|^export SLURM_CONF=", "starts a SLURM cluster as root (tests/slurm)"),
    (r"^pip (wheel|install) ", "builds/installs the wheel: tests/packaging/test_wheel.py does it in a fresh venv"),
    (r"^cd myproject$|data\.shards=PATH\b", "the wheel walk-through on the user's shards: tests/packaging/test_wheel.py"),
    (r"^satfuse demo\b", "the full-size demo (as make demo)"),
    (r"^bash hpc/gpu/|^make gpu-check\b", "the GPU check: downloads wheels here, runs on a GPU machine"),
]


def bash_blocks(path: Path) -> list[str]:
    """The ```bash blocks of a markdown file (indented ones in lists too), in order."""
    blocks, current, indent = [], None, ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if current is None and stripped == "```bash":
            current, indent = [], line[: len(line) - len(line.lstrip())]
        elif current is not None and stripped == "```":
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line[len(indent):] if line.startswith(indent) else line)
    assert current is None, f"{path}: unterminated ```bash block"
    return blocks


def commands(block: str) -> list[str]:
    """Logical commands of a block: `\\` continuations joined, comments and blank lines dropped."""
    out, pending = [], ""
    for line in block.splitlines():
        if pending:
            line = pending + " " + line.strip()
            pending = ""
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1].rstrip()
            continue
        cmd = re.sub(r"\s+#.*$", "", line).strip()
        if cmd and not cmd.startswith("#"):
            out.append(cmd)
    return out


def skip_reason(cmd: str) -> str | None:
    return next((why for pattern, why in SKIPS if re.search(pattern, cmd)), None)


def n(count: float, floor: int) -> int:
    return max(floor, round(count * SCALE))


def _sub_flag(cmd: str, flag: str, floor: int) -> str:
    return re.sub(rf"({re.escape(flag)}[ =])(\d+)", lambda m: f"{m.group(1)}{n(int(m.group(2)), floor)}", cmd)


def scaled(cmd: str) -> str:
    """The command with its sizes scaled down (unchanged at SATFUSE_README_SCALE=1)."""
    if SCALE >= 1:
        return cmd
    small = " --size 32"
    if cmd.startswith("satfuse synth sen12ms"):
        cmd = _sub_flag(_sub_flag(cmd, "--scenes", 2), "--patches-per-scene", 16) + small
    elif cmd.startswith("satfuse synth dfc2020"):
        cmd = _sub_flag(_sub_flag(cmd, "--n-validation", 48), "--n-test", 32) + small
    elif cmd.startswith("satfuse pretrain"):
        steps = n(180000, 6)
        cmd += (f" data.batch_size={n(200, 4)} train.steps={steps} checkpoint.every_steps={steps}"
                " model.backbone=tiny data.crop=32 train.log_every=1")
    elif cmd.startswith("satfuse finetune sweep"):
        cmd += (f" seeds=[40] label_fractions=[1.0] base.train.epochs={n(50, 1)} base.model.backbone=tiny"
                " base.data.crop=24")
    elif cmd.startswith("satfuse finetune"):
        cmd += f" --backbone tiny --epochs {n(50, 1)} data.crop=24"
    elif cmd.startswith("satfuse submit pretrain"):  # --cluster local: tiny.yaml's 20 steps
        cmd += f" train.steps={n(20, 3)} --wait"
    return cmd


def all_commands() -> list[tuple[str, str]]:
    cmds = []
    for doc in (ROOT / "README.md", ROOT / "slurm" / "README.md"):
        for block in bash_blocks(doc):
            cmds.extend((doc.relative_to(ROOT).as_posix(), c) for c in commands(block))
    return cmds


def test_blocks_are_found_and_every_skip_is_a_cluster_or_the_suite():
    cmds = all_commands()
    run = [c for _, c in cmds if not skip_reason(c)]
    assert any(c.startswith("satfuse pretrain") for c in run) and any("finetune sweep" in c for c in run)
    assert any("--cluster local" in c for c in run)
    assert scaled("satfuse synth sen12ms --out d --scenes 40 --patches-per-scene 100").startswith(
        f"satfuse synth sen12ms --out d --scenes {n(40, 2)} --patches-per-scene {n(100, 16)}")
    assert commands("a \\\n  b   # note\n# c\n\nd") == ["a b", "d"]


@pytest.mark.slow
@pytest.mark.timeout(900)  # every README command in turn: 3.6 min on a shared 2-core machine, 2x that loaded
def test_every_readme_command_works_as_written(tmp_path):
    (tmp_path / "hpc").symlink_to(ROOT / "hpc")  # the commands name configs as hpc/...
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    done, skipped = [], []
    for doc, cmd in all_commands():
        why = skip_reason(cmd)
        if why:
            skipped.append(f"{doc}: {cmd[:60]} ({why})")
            continue
        run = scaled(cmd)
        t0 = time.perf_counter()
        proc = subprocess.run(["bash", "-c", run], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
            pytest.fail(f"{doc}: `{cmd}` failed (exit {proc.returncode}) as\n  {run}\n"
                        f"after: {[shlex.split(d)[:3] for d in done]}\n{tail}")
        done.append(cmd)
        print(f"{time.perf_counter() - t0:6.1f}s  {run}")
    assert len(done) >= 15, done
    print("skipped:\n" + "\n".join(skipped))
    assert math.isfinite(SCALE)


def _keys(dc: type, prefix: str = "") -> set[str]:
    from dataclasses import fields, is_dataclass

    out: set[str] = set()
    inst = dc()
    for f in fields(dc):
        value = getattr(inst, f.name)
        out |= _keys(type(value), f"{prefix}{f.name}.") if is_dataclass(value) else {prefix + f.name}
    return out


def test_readme_names_and_numbers_agree_with_the_code():
    """Issue 21 item 7: the README's keys exist, and what it says matches the configs."""
    import yaml

    from satfuse.config import PretrainConfig
    from satfuse.evaluation.finetune import FinetuneConfig
    from satfuse.launch.cluster import ClusterProfile

    text = (ROOT / "README.md").read_text() + (ROOT / "slurm" / "README.md").read_text()
    prose = re.sub(r"```python\n.*?```", "", text, flags=re.S)  # attribute names in code are not config keys
    named = set(re.findall(r"\b((?:data|model|train|optim|loss|checkpoint|deepspeed)\.[a-z_0-9]+)", prose))
    assert named - (_keys(PretrainConfig) | _keys(FinetuneConfig)) == set()
    assert "data.multi_label_min_fraction" in text and "`min_fraction`" not in text
    pipe = text[text.index("`pipe:` URLs"):][:200]
    assert "data.manifest=" in pipe, pipe
    profile_delays = {ClusterProfile().signal_delay_s,
                      yaml.safe_load((ROOT / "hpc/clusters/example.yaml").read_text())["signal_delay_s"]}
    for doc in ("README.md", "slurm/README.md"):
        for line in (ROOT / doc).read_text().splitlines():
            if re.search(r"USR2@\d+", line):  # a fixed delay only for sbatch; submit: the profile's
                assert "sbatch" in line, (doc, line)
    sbatch = (ROOT / "slurm/pretrain.sbatch").read_text()
    assert all(f"USR2@{d}" in sbatch for d in re.findall(r"USR2@(\d+)", (ROOT / "slurm/README.md").read_text()))
    assert all(str(d) in text for d in profile_delays)
    assert "`pairs_per_s`" in text  # the metrics.jsonl key of the console's pairs/s
