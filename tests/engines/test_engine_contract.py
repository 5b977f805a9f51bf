"""The `Engine` base class is the contract every registered engine implements: each member says
why it exists, and `nan_policy=skip`'s keyword is the contract's, not one engine's."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from satfuse.engines.base import Engine
from satfuse.registry import ENGINES
from satfuse.utils import SatfuseError


def test_every_registered_engine_implements_the_documented_contract() -> None:
    members = [n for n, v in vars(Engine).items()
               if not n.startswith("_") and (inspect.isfunction(v) or isinstance(v, (property, classmethod)))]
    assert {"from_sections", "backward_step", "checkpoint_due", "resumed_from", "autocast"} <= set(members)
    assert [n for n in members if not inspect.getdoc(getattr(Engine, n))] == []
    for name, kind in ENGINES.items():
        cls = kind.engine_class()
        assert issubclass(cls, Engine) and cls.kind == name and not inspect.isabstract(cls)
        assert "skip" in inspect.signature(cls.backward_step).parameters, name


def test_an_engine_that_cannot_skip_refuses_the_keyword() -> None:
    """DeepSpeed steps inside its engine: its kind says nan_skip=False (the config refuses the
    policy first) and its backward_step refuses a skip hook instead of ignoring it."""
    assert ENGINES.get("ddp").nan_skip and not ENGINES.get("deepspeed").nan_skip
    cls = ENGINES.get("deepspeed").engine_class()
    with pytest.raises(SatfuseError, match="nan_policy=skip is not supported by train.engine=deepspeed"):
        cls.backward_step(SimpleNamespace(), torch.zeros(()), skip=lambda norm: True)
