"""The engines `train.engine` can name, as `satfuse.registry.ENGINES` holds them; torch-free.

An entry is an `EngineKind`: where its `Engine` subclass lives (imported only when a run
builds it), what it cannot honour of the `train` section, and which optional dependency it
needs. Why not register the `Engine` classes themselves: their modules import torch, and the
config is checked where torch is not loaded (`satfuse submit pretrain` on a login node takes
0.4 s, 5 s once torch and the engines are imported); DeepSpeed, an optional dependency, is
then imported only by the DeepSpeed engine's constructor.

Adding an engine: write its `Engine` subclass (`satfuse.engines.base`, the contract) in one
module and register it once, here for a built-in or in a plugin module (`SATFUSE_PLUGINS`)::

    ENGINES.register("fsdp", EngineKind(target="my_pkg.fsdp:FSDPEngine", nan_skip=False))
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from satfuse.config import ConfigError, TrainConfig
from satfuse.registry import ENGINES
from satfuse.resources import require_deepspeed
from satfuse.utils import SatfuseError

if TYPE_CHECKING:
    from satfuse.engines.base import Engine


@dataclass(frozen=True)
class EngineKind:
    """One registered engine, described without importing it."""

    # "module:Class" of the `Engine` subclass; imported by `engine_class` when a run builds it
    target: str
    # whether the engine honours `Engine.backward_step(loss, skip=...)`, i.e. can drop one
    # step's update on every rank after the gradients are reduced (train.nan_policy=skip)
    nan_skip: bool = True
    # whether the forward pass through its wrapped model may go through torch.compile (train.compile)
    compiles: bool = True
    # refuses the run, naming `where` (the config) and the install command, when the engine's
    # optional dependency is missing: called before any rank starts (launchers, the entry point)
    require: Callable[[str], None] | None = None

    def check_config(self, name: str, train: TrainConfig) -> None:
        """Refuse, before any process starts, the `train` keys this engine cannot honour."""
        if train.nan_policy == "skip" and not self.nan_skip:
            able = [n for n, k in ENGINES.items() if k.nan_skip]
            raise ConfigError(f"config: train.nan_policy=skip works with train.engine={'/'.join(able)} (an "
                              f"engine that can drop one step's update on every rank; {name} cannot); use "
                              f"train.nan_policy=stop with train.engine={name}")

    def check_compile(self, name: str) -> None:
        """Refuse train.compile=true for an engine whose wrapped model torch.compile cannot take."""
        if not self.compiles:
            able = [n for n, k in ENGINES.items() if k.compiles]
            raise SatfuseError(f"train.compile=true works with train.engine={'/'.join(able)}; set "
                               f"train.compile=false for train.engine={name}")

    def check_installed(self, where: str) -> None:
        """The optional dependency is installed (one line naming `where` and the fix, else)."""
        if self.require is not None:
            self.require(where)

    def engine_class(self) -> type[Engine]:
        """The `Engine` subclass `target` names, imported now (torch, never the optional dependency)."""
        module, _, attr = self.target.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise SatfuseError(f"engine target {self.target!r} cannot be imported ({exc}); register "
                               "'module:Class' of an Engine subclass") from exc


ENGINES.register("ddp", EngineKind(target="satfuse.engines.ddp:DDPEngine"))
ENGINES.register("deepspeed", EngineKind(target="satfuse.engines.deepspeed_engine:DeepSpeedEngine",
                                         nan_skip=False, compiles=False, require=require_deepspeed))
