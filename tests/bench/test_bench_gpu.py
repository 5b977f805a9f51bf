"""`satfuse bench gpu --device cpu --quick`: the GPU check's dry run exercises every section
(environment, correctness, model-only rows incl. torch.compile, the largest-batch search, the
real loader, the reference) and writes one JSON with measured, finite figures."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from satfuse.bench import gpu

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_cpu_dry_run_covers_every_section(sen12ms_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "satfuse.cli", "bench", "gpu", "--device", "cpu",
                           "--quick", "--no-deepspeed", "--shards", str(sen12ms_shards),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())["result"]
    assert res["ok"] and res["errors"] == []
    env = res["environment"]
    assert env["device"] == "cpu" and env["cpu_cores"] >= 1 and env["torch"]
    c = res["correctness"]
    lg = c["loss_grad"]
    assert lg["ok"] and 0 < lg["max_abs_diff_grad_s1"] <= gpu.LOSS_TOL  # fp32 vs float64: measured
    assert lg["max_abs_diff_loss"] + lg["max_abs_diff_grad_s2"] > 0
    assert c["ddp_bf16"]["backend"] == "gloo" and c["ddp_bf16"]["falling"]
    assert c["ddp_bf16"]["dtypes"] == {"expected": "torch.bfloat16", "loss": "torch.float32", "ok": True,
                                       "layers": {"Conv2d": ["torch.bfloat16"], "Linear": ["torch.bfloat16"]}}
    assert c["ddp_fp16"]["skipped"]  # CUDA only
    ck = c["checkpoint_cross_device"]
    assert ck["device_to_cpu"]["max_abs_diff"] == 0.0 and ck["cpu_to_device"]["max_abs_diff"] == 0.0
    rows = res["model_only"]["rows"]
    assert {r["variant"] for r in rows} == {"eager", "channels_last", "compile"}
    for r in rows:
        assert math.isfinite(r["pairs_per_s"]) and r["pairs_per_s"] > 0 and r["loss_finite"]
    assert res["model_only"]["largest_batch"][0]["largest_batch_fits"] >= 8
    assert [r["model"] for r in res["transformers"]["rows"]] == [
        "dual_simclr/timm:vit_tiny_patch16_224", "dual_simclr/swin_tiny_patch4_window7"]
    lrows = res["loader"]["rows"]
    assert [r["workers"] for r in lrows] == [0, 1]
    for r in lrows:
        assert 0 <= r["idle_fraction"] < 1 and r["loader_alone_pairs_per_s"] > 0 and r["bottleneck"]
    assert res["reference"]["images_per_s"] > 0
    assert "satfuse bench gpu:" in proc.stderr + proc.stdout  # the table


def test_a_failed_check_fails_the_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A correctness check that raises is recorded (the others still run) and `ok` is false."""
    def boom(*_a, **_k):
        raise RuntimeError("planted")

    monkeypatch.setattr(gpu, "check_loss_grad", boom)
    from satfuse.bench.commands import defaults_for, run_one

    args = defaults_for(gpu)
    args.device, args.quick, args.skip = "cpu", True, ["model_only", "transformers", "loader", "reference"]
    args.out = str(tmp_path / "r.json")
    assert run_one("gpu", gpu, args) == 1
    res = json.loads((tmp_path / "r.json").read_text())["result"]
    assert res["ok"] is False and "planted" in res["correctness"]["loss_grad"]["error"]
    assert res["correctness"]["ddp_bf16"]["ok"]


def test_bottleneck_is_named_from_the_rows() -> None:
    row = {"idle_fraction": 0.02, "step_s": 1.0, "data_wait_s": 0.02, "h2d_copy_s": 0.0,
           "loader_alone_pairs_per_s": 1e9, "batch": 8}
    assert gpu.name_bottleneck(row).startswith("none")
    row.update(idle_fraction=0.5, data_wait_s=0.5, h2d_copy_s=0.4)
    assert gpu.name_bottleneck(row) == "host-to-device copy"
    row.update(h2d_copy_s=0.0, loader_alone_pairs_per_s=1.0)
    assert gpu.name_bottleneck(row).startswith("CPU decode")


def test_dtype_and_overflow_checks_fail_when_precision_is_not_applied() -> None:
    """The checks bench gpu runs on CUDA, here on the CPU: layers outside autocast, or a scaler
    that does not skip an overflowing step, make them fail."""
    from torch import nn

    from satfuse.engines.base import autocast_context

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 8))
    x = torch.randn(2, 2, 8, 8)
    with autocast_context("bf16", torch.device("cpu")), gpu.layer_dtypes(model) as seen:
        out = model(x)
    assert gpu.check_dtypes(seen, out.float().pow(2).mean(), "bf16")["ok"]
    with gpu.layer_dtypes(model) as seen:  # autocast off
        out = model(x)
    bad = gpu.check_dtypes(seen, out.pow(2).mean(), "bf16")
    assert not bad["ok"] and bad["layers"] == {"Conv2d": ["torch.float32"], "Linear": ["torch.float32"]}
    assert not model[0]._forward_hooks  # the hooks are removed

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    res = gpu.overflow_step(model, opt, torch.amp.GradScaler("cpu"), model(x).pow(2).mean())
    assert res["ok"] and res["weights_unchanged"] and res["scale_after"] == res["scale_before"] / 2
    res = gpu.overflow_step(model, opt, torch.amp.GradScaler("cpu", enabled=False), model(x).pow(2).mean())
    assert not res["ok"] and not res["weights_unchanged"]  # the step ran on inf gradients


def test_transformer_rows_run_at_test_size_on_cpu() -> None:
    """The ViT-B/16 and Swin-T rows' code path (--quick: ViT-Ti/16 and Swin-T at crop 32):
    a Dual-SimCLR bf16 step per row, pairs/s measured; the full rows are ViT-B and Swin-T at 224/128."""
    from satfuse.bench.commands import defaults_for

    assert gpu.TRANSFORMERS == (("vit_base_patch16", (224, 128)), ("swin_tiny_patch4_window7", (224, 128)))
    args = gpu.quick_defaults(defaults_for(gpu))
    args.quick, args.precision, args.steps = True, "bf16", 1
    rows = gpu.transformer_rows(torch.device("cpu"), args)["rows"]
    assert [(r["model"], r["crop"], r["batch"], r["precision"]) for r in rows] == [
        ("dual_simclr/timm:vit_tiny_patch16_224", 32, 2, "bf16"), ("dual_simclr/swin_tiny_patch4_window7", 32, 2, "bf16")]
    assert all(r["pairs_per_s"] > 0 and r["loss_finite"] for r in rows)
    assert "| dual_simclr/swin_tiny_patch4_window7 | eager | 32 | 2 |" in gpu.format_table({"transformers": {"rows": rows}})
