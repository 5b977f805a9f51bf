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


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_training_step_runs_its_layers_in_the_configured_dtype(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str, dtype: torch.dtype
) -> None:
    """The trainer's own step (Trainer.train_step through the DDP engine): every conv and
    linear layer computes in bf16 under train.precision=bf16 (not only a finite loss), and
    the optimizer still updates fp32 master weights; a second step, after that update, is
    still finite (this replaced an end-to-end bf16 run that passed with bf16 off)."""
    from types import SimpleNamespace

    from satfuse.config import PretrainConfig, load_config
    from satfuse.engines.ddp import DDPEngine
    from satfuse.engines.trainer import Trainer
    from satfuse.models import build_pretrain_model
    from tests.models.test_methods import batch

    monkeypatch.setattr(base, "cpu_has_native_bf16", lambda: True)  # no emulation warning needed
    cfg = load_config(PretrainConfig, None, [
        "model.backbone=tiny", "model.proj_hidden=64", "model.proj_out=32",
        f"train.precision={precision}", f"train.run_dir={tmp_path}", "train.steps=2"])
    module = build_pretrain_model(cfg.model)
    engine = DDPEngine(module, torch.device("cpu"), cfg.train, cfg.optim, cfg.checkpoint)
    seen: dict[str, torch.dtype] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.dtype))
             for n, m in module.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    fake = SimpleNamespace(engine=engine, device=torch.device("cpu"), module=module, cfg=cfg, step=0,
                           forward=engine.model, _recent_keys={},
                           _first_bad=torch.zeros((), dtype=torch.long))
    before = [p.detach().clone() for p in module.parameters()]
    outs = [Trainer.train_step(fake, {"key": ["a"] * 6, **batch()}) for _ in range(2)]
    for h in hooks:
        h.remove()
    assert seen and set(seen.values()) == {dtype}, seen
    assert all(torch.isfinite(out["loss"]) and torch.isfinite(out["grad_norm"]) for out in outs), outs
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in module.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, module.parameters(), strict=True))  # updated
