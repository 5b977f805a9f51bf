"""A toy checkpoint backend from outside src/: one module plus one registration (loaded with
SATFUSE_PLUGINS=tests.extensions.ckpt_toy_backend). Rank 0 writes the whole model as one
`model.pt`; the commit protocol does the rest (temp dir, meta.json, `latest`, pruning,
verification, resume search), knowing nothing of `model.pt` but what this backend reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from satfuse.checkpoint.backend import Builder, CheckpointBackend
from satfuse.checkpoint.layout import rank_file, read_meta
from satfuse.checkpoint.state import fingerprint, load_rank_state, to_plain, write_rank_state
from satfuse.checkpoint.trust import load_torch_file
from satfuse.config import CheckpointConfig
from satfuse.distributed.collectives import rank
from satfuse.registry import CHECKPOINT_BACKENDS

MODEL_FILE = "model.pt"


@CHECKPOINT_BACKENDS.register("toy_pt")
class ToyBackend(CheckpointBackend):
    """Everything in one file, written by rank 0 (fine for a model that fits one host)."""

    kind = "toy_pt"
    label = "the toy engine"

    @classmethod
    def from_config(cls, run_dir: Path, section: CheckpointConfig, timeout_s: float, **engine: Any) -> ToyBackend:
        return cls(run_dir, **cls.config_kwargs(section, timeout_s))

    @classmethod
    def required_files(cls, meta: dict[str, Any]) -> list[str]:
        return [MODEL_FILE]

    @classmethod
    def claims(cls, path: Path) -> bool:
        return (Path(path) / MODEL_FILE).is_file()

    @classmethod
    def load_model(cls, ckpt_dir: Path, builder: Builder, trust: bool = False) -> tuple[nn.Module, dict[str, Any]]:
        meta = read_meta(ckpt_dir)
        model = builder(meta)
        model.load_state_dict(load_torch_file(Path(ckpt_dir) / MODEL_FILE, trust)["model_optim"]["model"])
        return model, meta

    def save(self, step: int, app_state: dict[str, Any], rank_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        staged = self.begin(step, meta, *fingerprint(app_state))
        written: dict[str, dict[str, Any] | None] = {
            rank_file(rank()): write_rank_state(staged.tmp / rank_file(rank()), rank_state)}
        if rank() == 0:
            torch.save(to_plain(app_state), staged.tmp / MODEL_FILE)
            written[MODEL_FILE] = None  # hashed by the protocol, on this rank
        return self.finish(staged, None, written)

    def load(self, path: Path, app_state: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        path = self.verify(Path(path))
        meta = read_meta(path)
        self.check_kind(path, meta)
        self.check_model(path, meta, fingerprint(app_state)[0])
        saved = load_torch_file(path / MODEL_FILE, self.trust)
        for key, value in app_state.items():
            value.load_state_dict(saved[key])
        self.loaded_path = path
        return [load_rank_state(path / rank_file(r), self.trust) for r in range(int(meta["world_size"]))], meta
