"""Every extension point of satfuse, one registry each, and the plugin modules that fill them.

A new backbone, pretraining method, dataset, downstream benchmark, segmentation decoder, engine or
checkpoint backend is one module plus one registration::

    from satfuse.registry import BACKBONES

    @BACKBONES.register("my_vit")
    class MyViT(Backbone): ...

Built-in entries live in the modules each registry names below; they are imported on the first
lookup, not when this module is, so `satfuse --help` and the torch-free launcher side can list
the extension points without importing torch, and no registry import forms a cycle.

Code from outside the source tree (a research repo, a test file) joins the same registries
through a *plugin module*: any module named in the `SATFUSE_PLUGINS` environment variable
(comma-separated import paths; it reaches torchrun ranks and SLURM jobs with the rest of the
environment) or in the `satfuse.plugins` entry-point group of an installed package is imported
before the first lookup, and registers its entries the same way the built-ins do. This module
is the one reader of `SATFUSE_PLUGINS`.

Why registries and not if-chains: CLI choices, config validation and error messages all read the
names from here, so adding an entry never means editing copied name lists in six files.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

PLUGINS_ENV = "SATFUSE_PLUGINS"
PLUGINS_ENTRY_POINT_GROUP = "satfuse.plugins"

T = TypeVar("T")

_plugins_loaded = False


def plugin_modules(environ: dict[str, str] | None = None) -> list[str]:
    """The plugin module paths `SATFUSE_PLUGINS` names, in order, blanks dropped."""
    env = os.environ if environ is None else environ
    return [p.strip() for p in env.get(PLUGINS_ENV, "").split(",") if p.strip()]


def load_plugins() -> None:
    """Import every plugin module once per process (environment first, then entry points).

    A plugin that fails to import stops the run with the module's name and the fix: a backbone
    that silently vanished would only show up as "unknown backbone" much later, on some rank.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True  # set first: a plugin may itself look names up while it registers
    for path in plugin_modules():
        _import_plugin(path, f"{PLUGINS_ENV}={os.environ.get(PLUGINS_ENV, '')}")
    for ep in entry_points(group=PLUGINS_ENTRY_POINT_GROUP):
        _import_plugin(ep.value.split(":")[0], f"entry point {ep.name!r} of group {PLUGINS_ENTRY_POINT_GROUP}")


def _import_plugin(path: str, source: str) -> None:
    try:
        importlib.import_module(path)
    except ImportError as exc:
        raise SatfuseError(f"plugin module {path!r} (from {source}) cannot be imported ({exc}); "
                           "put it on PYTHONPATH or correct the name") from exc
    log.debug("plugin module %s loaded (from %s)", path, source)


class Registry(Generic[T]):
    """Names -> entries for one extension point.

    `what` names the extension point in messages ("backbone"); `builtins` are the modules whose
    import registers the built-in entries; `key` is the config key or CLI flag users set, so an
    unknown name's error says where to fix it.
    """

    def __init__(self, what: str, builtins: tuple[str, ...], key: str) -> None:
        self.what = what
        self.key = key
        self._builtins = builtins
        self._entries: dict[str, T] = {}
        self._prefixes: dict[str, tuple[str, Callable[[str], T] | str]] = {}
        self._loaded = False

    def register(self, name: str, entry: T | None = None) -> Callable[[T], T] | T:
        """Register `entry` under `name`; used bare (`register("x", obj)`) or as a decorator.

        A name registered twice is refused: two plugins that both claim "vit_b" would otherwise
        train whichever was imported last. The object a lazy entry (`register_lazy`) points at
        takes that entry's place when its module registers it.
        """
        def add(obj: T) -> T:
            old = self._entries.get(name)
            if isinstance(obj, Lazy) and old is not None and _origin(old, ":") == obj.target:
                return old  # the module was imported first: its object stays
            if old is not None and old is not obj and not (isinstance(old, Lazy) and old.target == _origin(obj, ":")):
                raise SatfuseError(f"{self.what} {name!r} is registered twice "
                                   f"({_origin(old)} and {_origin(obj)}); rename one")
            self._entries[name] = obj
            return obj
        return add if entry is None else add(entry)

    def register_lazy(self, name: str, target: str) -> None:
        """Register `name` as `"module:attribute"`, imported on the first `get`: the names of
        torch-backed built-ins (backbones, methods) stay listable and checkable torch-free
        (`satfuse submit` validates a config without importing torch)."""
        self.register(name, Lazy(target))  # type: ignore[arg-type]

    def register_prefix(self, prefix: str, factory: Callable[[str], T] | str, shown: str) -> None:
        """Names `<prefix><rest>` are made by `factory(rest)` (a callable, or `"module:attribute"`
        imported on first use) instead of being registered one by one: `timm:<any timm model>`
        covers a library's whole catalogue. `shown` is how `names()` and errors list the family
        ("timm:<any timm model>"); `items()` lists only registered names (a family has no end)."""
        if prefix in self._prefixes:
            raise SatfuseError(f"{self.what} prefix {prefix!r} is registered twice; rename one")
        self._prefixes[prefix] = (shown, factory)

    def _prefix_of(self, name: str) -> str | None:
        return next((p for p in self._prefixes if name.startswith(p) and len(name) > len(p)), None)

    def require(self, name: str) -> None:
        """Refuse an unknown `name` (one line listing every choice) without importing its entry;
        a prefixed name (`timm:...`) passes here and is checked by its factory on `get`."""
        self._load()
        if name not in self._entries and self._prefix_of(name) is None:
            hint = "" if plugin_modules() else f" (a plugin's entries need {PLUGINS_ENV}=module)"
            raise SatfuseError(f"unknown {self.what} {name!r} in {self.key}; choose one of: "
                               f"{', '.join(self.names())}{hint}")

    def _resolve(self, name: str) -> T:
        entry = self._entries[name]
        if isinstance(entry, Lazy):
            module, _, attr = entry.target.partition(":")
            obj = getattr(importlib.import_module(module), attr)  # its decorator may register it too
            self._entries[name] = obj
            return obj
        return entry

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._builtins:
                importlib.import_module(module)
            load_plugins()

    def get(self, name: str) -> T:
        """The entry called `name`; an unknown name is a one-line error listing every choice."""
        self.require(name)
        if name in self._entries:
            return self._resolve(name)
        prefix = self._prefix_of(name)
        shown, factory = self._prefixes[prefix]  # type: ignore[index]
        if isinstance(factory, str):
            module, _, attr = factory.partition(":")
            factory = getattr(importlib.import_module(module), attr)
            self._prefixes[prefix] = (shown, factory)  # type: ignore[index]
        return factory(name[len(prefix):])  # type: ignore[index]

    def names(self) -> list[str]:
        """Every registered name, sorted, then each prefix family as users write it
        (`timm:<any timm model>`): for config checks and messages."""
        self._load()
        return sorted(self._entries) + [shown for shown, _ in self._prefixes.values()]

    def in_order(self) -> list[str]:
        """Every registered name in registration order (built-ins as their module registers them,
        then plugins): for CLI choices and help, whose order users already know."""
        self._load()
        return list(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        """Every (name, entry), sorted; lazy entries are imported."""
        self._load()
        yield from ((name, self._resolve(name)) for name in sorted(self._entries))

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries


class Lazy:
    """A registered name whose entry is `"module:attribute"`, imported on first use."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.__module__, _, self.__qualname__ = target.partition(":")


def _origin(obj: object, sep: str = ".") -> str:
    return f"{getattr(obj, '__module__', '?')}{sep}{getattr(obj, '__qualname__', type(obj).__name__)}"


# --------------------------------------------------------------------------------------------
# The extension points. Each registry's contract (what an entry must provide) is written once,
# next to its built-in entries; docs/architecture.md has a recipe per extension point.
# --------------------------------------------------------------------------------------------

BACKBONES: Registry = Registry("backbone", ("satfuse.models.catalog",), "model.backbone")
METHODS: Registry = Registry("pretraining method", ("satfuse.models.catalog",), "model.method")
DATASETS: Registry = Registry("dataset", ("satfuse.data.sources.catalog",), "--dataset")
BENCHMARKS: Registry = Registry("downstream benchmark", ("satfuse.evaluation.dfc2020", "satfuse.evaluation.bigearthnet19",
                                                         "satfuse.evaluation.sen12ms_igbp", "satfuse.evaluation.segmentation"),
                                "data.benchmark")
ENGINES: Registry = Registry("engine", ("satfuse.engines.kinds",), "train.engine")
DECODERS: Registry = Registry("segmentation decoder", ("satfuse.models.decoders",), "model.decoder")
CHECKPOINT_BACKENDS: Registry = Registry("checkpoint backend", ("satfuse.checkpoint.manager", "satfuse.checkpoint.deepspeed_backend"), "checkpoint kind (meta.json)")
