"""A built wheel works outside the repository, as a cluster user installs and runs it.

The checkout's packaging inputs are copied to a temporary directory (with a marked version, so
single-sourcing is checked, not assumed), an sdist is built from the copy and a wheel from the
sdist (so both carry the configs), and the wheel is installed into a fresh virtual env.

Reusing the torch already installed, with no network: the fresh env is created `--without-pip`
and gets one `.pth` file holding the *path* of the running interpreter's site-packages (the
`.venv` of `make setup`), appended after its own site-packages. Its own satfuse (the wheel)
therefore wins, while torch, numpy, rasterio... come from `.venv`. A plain path line does not
process `.venv`'s own `.pth` files, so the editable install of the checkout stays invisible
(`--system-site-packages` would not help: torch lives in `.venv`, not in the system Python).
The wheel goes in with this pip (`pip --python NEW_ENV install --no-deps --no-index`), before
the `.pth` is written, so pip never sees (let alone uninstalls) the checkout's editable install.
Every command then runs from an empty directory with PYTHONPATH removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VERSION = "0.1.0+wheeltest"  # written into the copy's satfuse/__init__.py only
INPUTS = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "src", "hpc", "slurm"]

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, timeout: float = 300, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _expected_packaged() -> set[str]:
    """What the wheel must carry: every config under hpc/, the sbatch templates, slurm/README.md."""
    hpc = {str(p.relative_to(ROOT)) for p in (ROOT / "hpc").rglob("*")
           if p.is_file() and p.suffix in (".yaml", ".json", ".md")}
    return hpc | {str(p.relative_to(ROOT)) for p in (ROOT / "slurm").glob("*.sbatch")} | {"slurm/README.md"}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src-copy"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in INPUTS:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=ignore)
        else:
            shutil.copy2(p, src / name)
    init = src / "src" / "satfuse" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]+"', f'__version__ = "{VERSION}"', init.read_text()))
    dist = base / "dist"
    _run([sys.executable, "-c", f"from setuptools import build_meta as b; b.build_sdist({str(dist)!r})"], src)
    (sdist,) = dist.glob("*.tar.gz")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(dist), str(sdist)], base)
    (wheel,) = dist.glob("*.whl")
    return {"base": base, "sdist": sdist, "wheel": wheel}


def test_sdist_and_wheel_carry_the_configs_and_templates(built):
    expected = _expected_packaged()
    assert {"hpc/pretrain/tiny.yaml", "hpc/deepspeed/zero1_bf16.json", "hpc/clusters/example.yaml",
            "slurm/pretrain.sbatch"} <= expected
    with tarfile.open(built["sdist"]) as tf:
        in_sdist = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    assert expected <= in_sdist, sorted(expected - in_sdist)
    with zipfile.ZipFile(built["wheel"]) as zf:
        names = zf.namelist()
        metadata = zf.read(f"satfuse-{VERSION}.dist-info/METADATA").decode()
    prefix = "satfuse/_packaged/"
    in_wheel = {n[len(prefix):] for n in names if n.startswith(prefix)}
    assert in_wheel == expected  # the test cluster's scripts (slurm/local-cluster) stay out
    assert f"\nVersion: {VERSION}\n" in metadata  # the version comes from satfuse/__init__.py
    assert "Requires-Dist: deepspeed" in metadata and 'extra == "deepspeed"' in metadata
    assert not re.search(r"Requires-Dist: deepspeed[^;\n]*\n", metadata)  # only as an extra


@pytest.fixture(scope="module")
def installed(built) -> dict[str, Path]:
    env_dir = built["base"] / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], built["base"])
    py = env_dir / "bin" / "python"
    purelib = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   built["base"]).strip()
    # install before the .pth exists: pip then sees an empty env and can never touch .venv's
    # own (editable) satfuse
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
          str(built["wheel"])], built["base"])
    base_site = os.path.realpath(sysconfig.get_paths()["purelib"])  # torch and the other deps
    Path(purelib, "_satfuse_test_base_env.pth").write_text(base_site + "\n")
    return {"venv": env_dir, "satfuse": env_dir / "bin" / "satfuse", "python": py}


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_installed_wheel_runs_from_an_empty_directory(installed, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    env = _clean_env()
    sf = str(installed["satfuse"])

    where = _run([str(installed["python"]), "-c", "import satfuse; print(satfuse.__file__)"], work, env=env)
    assert where.strip().startswith(str(installed["venv"])), where  # the wheel, not the checkout
    assert VERSION in _run([sf, "--version"], work, env=env)

    listing = _run([sf, "configs"], work, env=env)
    packaged = installed["venv"].resolve()
    for kind, name in (("pretrain", "tiny"), ("deepspeed", "zero1_bf16"), ("clusters", "example")):
        line = next(ln for ln in listing.splitlines() if ln.strip().startswith(f"{name} "))
        path = Path(line.split()[1])
        assert path.is_file() and packaged in path.resolve().parents, line
        assert path.parent.name == kind

    told = _run([sf, "init", "proj"], work, env=env)
    assert (work / "proj" / "hpc" / "clusters" / "example.yaml").is_file()
    assert (work / "proj" / "slurm" / "pretrain.sbatch").is_file()
    assert all(w in told for w in ("partition", "account", "SATFUSE_IFNAME"))

    _run([sf, "synth", "sen12ms", "--scenes", "2", "--patches-per-scene", "8", "--size", "32", "--out", "raw"],
         work, env=env)
    _run([sf, "shard", "--src", "raw", "--dataset", "sen12ms", "--out", "shards/sen12ms", "--maxcount", "4"],
         work, env=env)
    out = _run([sf, "pretrain", "--config", "tiny", "--nproc-per-node", "2", "data.shards=shards/sen12ms",
                "data.batch_size=4", "train.steps=2", "train.run_dir=run", "checkpoint.every_steps=2"],
               work, env=env, timeout=240)
    assert "done: step 2" in out, out

    latest = (work / "run" / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((work / "run" / "checkpoints" / latest / "meta.json").read_text())
    assert meta["satfuse_version"] == VERSION and meta["world_size"] == 2
    manifest = json.loads((work / "shards" / "sen12ms" / "manifest.json").read_text())
    assert VERSION in json.dumps(manifest)
    # nothing written into the directory but what was asked for
    assert sorted(p.name for p in work.iterdir()) == ["proj", "raw", "run", "shards"]
