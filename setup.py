"""Build hook: the wheel carries the top-level `hpc/` configs and `slurm/` sbatch templates.

They stay where they are (the source of truth); `build_py` copies them into the built package
as `satfuse/_packaged/{hpc,slurm}` so an installed satfuse finds them (`satfuse.resources`).
The sdist carries the same files through MANIFEST.in, so a wheel built from the sdist gets
them too. An editable install skips the copy: it reads the checkout's folders directly.
Everything else about the project is in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# (folder, glob) pairs; keep in step with MANIFEST.in (tests/packaging checks both artifacts)
PACKAGED = [("hpc", "**/*.yaml"), ("hpc", "**/*.json"), ("hpc", "**/*.md"),
            ("slurm", "*.sbatch"), ("slurm", "README.md")]


def packaged_files() -> list[Path]:
    """Repository-relative paths of the files the wheel carries."""
    found = {f.relative_to(ROOT) for folder, pattern in PACKAGED for f in (ROOT / folder).glob(pattern)
             if f.is_file() and "__pycache__" not in f.parts}
    return sorted(found)


class BuildWithConfigs(build_py):
    """`build_py`, then copy hpc/ and the slurm/ templates into satfuse/_packaged/."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "satfuse" / "_packaged"
        if target.exists():
            shutil.rmtree(target)  # a stale file from an earlier build must not ship
        files = packaged_files()
        if not any(f.parts[0] == "hpc" for f in files):
            raise RuntimeError(f"{ROOT / 'hpc'}: no configs found to package; build from a full checkout or sdist")
        for rel in files:
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest)


setup(cmdclass={"build_py": BuildWithConfigs})
