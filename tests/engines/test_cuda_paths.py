"""The CUDA-path items a CPU can check: pinned batches, non-blocking channels_last copies,
cuDNN autotuning for fixed crops, torch.compile as a config switch, NCCL error handling and
the local rank -> GPU mapping under torchrun, srun and submitit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import satfuse.data.reading.pretrain_loader as pretrain_loader
import satfuse.distributed.collectives as coll
import satfuse.distributed.env as denv
import satfuse.distributed.launcher_env as lenv
from satfuse.config import DataConfig, PretrainConfig, load_config
from satfuse.data.reading.pretrain_loader import PretrainLoader
from satfuse.data.reading.shard_sets import resolve_shards
from satfuse.distributed.env import DistEnv, cuda_index, detect_env
from satfuse.engines import setup
from satfuse.engines import trainer as tr
from satfuse.utils import SatfuseError

TINY = Path(__file__).resolve().parents[2] / "hpc" / "pretrain" / "tiny.yaml"

def tiny(shards: Path, run_dir: Path, *extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, TINY, [
        f"data.shards={shards}", f"train.run_dir={run_dir}", "train.steps=2", "train.log_every=1",
        "checkpoint.every_steps=2", *extra])


def test_to_device_channels_last_only_for_images() -> None:
    batch = {"s1": torch.randn(2, 2, 8, 8), "mask": torch.ones(2), "key": ["a", "b"]}
    out = setup.to_device(batch, torch.device("cpu"), channels_last=True)
    assert out["s1"].is_contiguous(memory_format=torch.channels_last)
    assert not batch["s1"].is_contiguous(memory_format=torch.channels_last)
    assert out["mask"].shape == (2,) and out["key"] == ["a", "b"]
    plain = setup.to_device(batch, torch.device("cpu"))
    assert plain["s1"].is_contiguous()


@pytest.mark.parametrize(("device", "crop", "want"), [("cuda", 128, True), ("cuda", 0, False),
                                                       ("cpu", 128, False)])
def test_cudnn_benchmark_for_fixed_crops(device: str, crop: int, want: bool) -> None:
    saved = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        setup.configure_backends(crop, torch.device(device, 0) if device == "cuda" else torch.device("cpu"))
        assert torch.backends.cudnn.benchmark is want
    finally:
        torch.backends.cudnn.benchmark = saved


def test_loader_pins_batches_when_asked(sen12ms_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict] = []

    class Spy:
        def __init__(self, *args, **kwargs) -> None:
            seen.append(kwargs)
            raise StopIteration

    monkeypatch.setattr(pretrain_loader, "DataLoader", Spy)
    shards = resolve_shards(str(sen12ms_shards))
    for pin in (True, False):
        loader = PretrainLoader(shards, DataConfig(shards=str(sen12ms_shards), batch_size=4,
                                                          num_workers=0, crop=32),
                                       rank=0, world_size=1, seed=0, pin_memory=pin)
        with pytest.raises((StopIteration, RuntimeError)):
            next(iter(loader))
    assert [k["pin_memory"] for k in seen] == [True, False]


def test_trainer_channels_last_and_compile(sen12ms_shards: Path, tmp_path: Path) -> None:
    """train.compile=true (inductor on CPU) and train.channels_last=true train the tiny model."""
    cfg = tiny(sen12ms_shards, tmp_path / "run", "train.compile=true", "train.channels_last=true")
    trainer = tr.Trainer(cfg, DistEnv())
    assert trainer.forward is not trainer.engine.model  # compiled
    conv = next(m for m in trainer.module.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    result = trainer.fit()
    assert result.step == 2 and torch.isfinite(torch.tensor(result.final_loss))


def test_compile_with_deepspeed_is_refused() -> None:
    cfg = load_config(PretrainConfig, None, ["train.compile=true", "train.engine=deepspeed"])
    with pytest.raises(SatfuseError, match="train.compile=true works with train.engine=ddp"):
        setup.compiled_forward(cfg.train, torch.nn.Linear(2, 2))


def test_nccl_async_error_handling_is_set_but_user_values_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    monkeypatch.setenv("NCCL_ASYNC_ERROR_HANDLING", "3")
    denv.configure_nccl()
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert os.environ["NCCL_ASYNC_ERROR_HANDLING"] == "3"


TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}
# srun (and submitit, which runs each task under srun and reads the same SLURM variables)
SRUN = {"SLURM_PROCID": "6", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
        "SLURM_NTASKS": "8", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "77",
        "SLURM_STEP_NUM_NODES": "2", "SLURM_TASKS_PER_NODE": "4(x2)"}


@pytest.mark.parametrize(("environ", "local"), [(TORCHRUN, 1), (SRUN, 2)])
@pytest.mark.parametrize(("visible", "index"), [(4, None), (1, 0)])
def test_local_rank_to_gpu(monkeypatch: pytest.MonkeyPatch, environ: dict, local: int,
                           visible: int, index: int | None) -> None:
    """All GPUs visible (torchrun, srun --gpus-per-node): GPU = local rank; one GPU bound per
    task (srun --gpus-per-task=1, submitit): GPU 0 - never set_device(local rank) on it."""
    monkeypatch.setattr(lenv, "parse_nodelist", lambda _: ["gpu01", "gpu02"])
    monkeypatch.setattr(lenv.shutil, "which", lambda _: None)
    env = detect_env(environ, backend="nccl")
    assert env.local_rank == local
    want = local if index is None else index
    assert cuda_index(env.local_rank, visible) == want
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert setup.select_device("cuda", env.local_rank) == torch.device("cuda", want)


def test_no_visible_gpu_is_a_clear_error() -> None:
    with pytest.raises(SatfuseError, match="CUDA_VISIBLE_DEVICES"):
        cuda_index(0, 0)


def test_training_step_reads_nothing_on_the_host(sen12ms_shards: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """No `.item()`/`float()`/`bool()` of a tensor in satfuse's code inside a step (each one
    is a GPU synchronisation); the numbers are read on log steps only (`read_metrics`)."""
    trainer = tr.Trainer(tiny(sen12ms_shards, tmp_path / "run"), DistEnv())
    batches = iter(trainer.loader)
    trainer.train_step(next(batches))  # warm-up
    src = str(Path(tr.__file__).resolve().parents[1])
    reads: list[str] = []

    def spy(name: str):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            import sys

            frame = sys._getframe(1)
            if frame.f_code.co_filename.startswith(src):
                reads.append(f"{name} at {frame.f_code.co_filename}:{frame.f_lineno}")
            return original(self, *a, **k)
        return wrapper

    for name in ("item", "__float__", "__bool__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    out = trainer.train_step(next(batches))
    assert reads == []
    monkeypatch.undo()
    values = tr.read_metrics(out)
    assert set(values) >= {"loss", "grad_norm", "retrieval_top1"}
    assert all(isinstance(v, float) for v in values.values())


def test_equal_rows_skips_the_size_exchange(monkeypatch: pytest.MonkeyPatch) -> None:
    from satfuse.distributed import gather

    def no_collective(*_a, **_k):
        raise AssertionError("all_gather called")

    monkeypatch.setattr(gather, "world", lambda group=None: 4)
    monkeypatch.setattr(gather.dist, "all_gather", no_collective)
    monkeypatch.setattr(gather.dist, "get_backend", lambda group=None: "gloo")
    with gather.equal_rows():
        assert gather.gather_sizes(torch.zeros(3, 2)) == [3, 3, 3, 3]
    with pytest.raises(AssertionError, match="all_gather called"):
        gather.gather_sizes(torch.zeros(3, 2))


def test_nan_found_at_the_next_save_is_never_checkpointed(sen12ms_shards: Path, tmp_path: Path) -> None:
    """The NaN check runs on log steps and before every save: a non-finite step between two
    log steps stops the run at the next save, naming the step, and no checkpoint keeps it."""
    run = tmp_path / "run"
    cfg = tiny(sen12ms_shards, run, "optim.lr=1e30", "optim.name=lars", "train.steps=6",
               "train.log_every=100", "checkpoint.every_steps=3")
    with pytest.raises(SatfuseError, match=r"non-finite loss at step [123] \(batch keys \["):
        tr.Trainer(cfg, DistEnv()).fit()
    assert not (run / "checkpoints" / "latest").exists()


def test_stop_flag_goes_through_gloo_on_nccl_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-step stop agreement uses a gloo group when the job is NCCL (no GPU sync),
    made once; the default group when it is gloo; none without a group."""
    made: list[str] = []
    monkeypatch.setattr(coll, "_GROUPS", {})
    monkeypatch.setattr(coll, "dist_ready", lambda: False)
    assert coll.control_group() is None
    monkeypatch.setattr(coll, "dist_ready", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "gloo")
    assert coll.control_group() is None
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.distributed, "new_group", lambda backend=None: made.append(backend) or "g")
    assert coll.control_group() == "g" and coll.control_group() == "g"
    assert made == ["gloo"]
