"""The registry every extension point shares, and the plugin modules that fill it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from satfuse.registry import Registry, plugin_modules
from satfuse.utils import SatfuseError


def test_names_lookups_and_refusals() -> None:
    reg: Registry = Registry("widget", (), "x.widget")
    reg.register("b", 2)

    @reg.register("a")
    def build_a() -> int:
        return 1

    assert reg.names() == ["a", "b"] and reg.get("a") is build_a and "b" in reg and "c" not in reg
    with pytest.raises(SatfuseError, match=r"unknown widget 'c' in x\.widget; choose one of: a, b"):
        reg.get("c")
    with pytest.raises(SatfuseError, match="widget 'b' is registered twice"):
        reg.register("b", 3)
    reg.register("b", 2)  # the same object again (a module imported twice) is no conflict
    reg.register_lazy("d", "collections:OrderedDict")
    assert "d" in reg and reg.names() == ["a", "b", "d"]
    import collections
    assert reg.get("d") is collections.OrderedDict
    reg.register("d", collections.OrderedDict)  # its module registering it too is no conflict
    with pytest.raises(SatfuseError, match="widget 'e' in x.widget"):
        reg.require("e")


def test_builtins_import_on_first_lookup_and_plugins_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / "sf_toy_plugin.py").write_text(
        "from satfuse.registry import BACKBONES\nBACKBONES.register('toy_plugin_net', object)\n")
    code = ("import sys; from satfuse.registry import BACKBONES\n"
            "assert 'satfuse.models.backbones' not in sys.modules\n"
            "names = BACKBONES.names(); BACKBONES.require('resnet50')\n"
            "assert 'torch' not in sys.modules, 'listing and checking built-in names imports no torch'\n"
            "assert BACKBONES.get('tiny').__name__ == 'TinyResNet' and 'torch' in sys.modules\n"
            "print(' '.join(names))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]),
           "SATFUSE_PLUGINS": " sf_toy_plugin, "}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    names = out.stdout.split()
    assert "toy_plugin_net" in names, out.stdout + out.stderr
    assert "resnet50" in names and "tiny" in names  # the built-ins, imported on that first lookup
    env["SATFUSE_PLUGINS"] = "sf_no_such_plugin"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "plugin module 'sf_no_such_plugin'" in bad.stderr
    assert plugin_modules({"SATFUSE_PLUGINS": "a, ,b"}) == ["a", "b"]
