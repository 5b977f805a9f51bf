"""Precision checks at start: refused combinations and the emulated-bf16 warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from satfuse.engines import base
from satfuse.engines.base import check_precision, cpu_has_native_bf16
from satfuse.utils import SatfuseError


def _cpuinfo(tmp_path: Path, line: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\n{line}\n\nprocessor\t: 1\n{line}\n")
    return str(path)


@pytest.mark.parametrize(("line", "native"), [
    ("flags\t\t: fpu sse avx avx2 fma", False),                      # AVX2 only (e.g. EPYC Rome)
    ("flags\t\t: fpu avx2 avx512f avx512_bf16", True),               # Cooper Lake, Zen 4
    ("flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile", True),          # Sapphire Rapids
    ("Features\t: fp asimd sve bf16 i8mm", True),                    # Arm Neoverse V1
    ("Features\t: fp asimd", False),
])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path, line: str, native: bool) -> None:
    assert cpu_has_native_bf16.__wrapped__(_cpuinfo(tmp_path, line)) is native


def test_unreadable_cpuinfo_is_unknown_not_false(tmp_path: Path) -> None:
    assert cpu_has_native_bf16.__wrapped__(str(tmp_path / "missing")) is None


def test_bf16_on_an_emulating_cpu_warns_and_fp16_on_cpu_is_refused(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(base, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="satfuse.engines.base"):
        check_precision("bf16", torch.device("cpu"))
    assert "train.precision=fp32" in caplog.text
    caplog.clear()
    monkeypatch.setattr(base, "cpu_has_native_bf16", lambda: True)
    with caplog.at_level(logging.WARNING, logger="satfuse.engines.base"):
        check_precision("bf16", torch.device("cpu"))
        check_precision("fp32", torch.device("cpu"))
    assert caplog.text == ""
    with pytest.raises(SatfuseError, match="fp16 needs a CUDA GPU"):
        check_precision("fp16", torch.device("cpu"))
