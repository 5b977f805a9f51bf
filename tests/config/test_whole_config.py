"""Each component receives its own config sections (issue 15, item 5): only the places that
split a command's config into sections (or record all of it) take the whole config; and every
key is read somewhere (a key that does nothing is a bug)."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import satfuse

SRC = Path(satfuse.__file__).resolve().parent  # the satfuse under test (PYTHONPATH wins)
WHOLE = ("PretrainConfig", "FinetuneConfig")
COMPOSITION_ROOTS = {
    "engines/trainer.py:Trainer.__init__",  # builds loader, model, engine from their sections
    "engines/pretrain.py:pretrain",  # the entry point: process group, then the trainer
    "engines/pretrain.py:show_shell_commands",  # `--dry-run`: what every section would do
    "engines/run_records.py:write_config",  # config.yaml records the whole resolved config
    "evaluation/finetune.py:run_finetune",  # one fine-tuning run: model, data, loop from sections
    "evaluation/finetune.py:Trainer.__init__",  # the epoch loop (data, train, log sections, run_dir)
    "evaluation/segmentation.py:run_segmentation",  # one segmentation run (run_finetune's counterpart)
    "evaluation/segmentation.py:SegTrainer.__init__",  # its epoch loop (data, train, log sections, run_dir)
}


def takers_of_the_whole_config() -> set[str]:
    """Every function under satfuse/ with a parameter annotated with a whole command config."""
    found = set()
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
            if any(a.annotation is not None and any(w in ast.unparse(a.annotation) for w in WHOLE)
                   for a in args):
                owner = parents.get(node)
                name = f"{owner.name}.{node.name}" if isinstance(owner, ast.ClassDef) else node.name
                found.add(f"{path.relative_to(SRC).as_posix()}:{name}")
    return found


def test_only_the_composition_roots_take_the_whole_config() -> None:
    assert takers_of_the_whole_config() == COMPOSITION_ROOTS


def leaf_keys(schema: type, prefix: str = "") -> list[str]:
    """Dotted keys of every value (not section) of a config schema."""
    out = []
    for f in dataclasses.fields(schema):
        value = getattr(schema(), f.name)
        out += leaf_keys(type(value), f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]
    return out


def unread_keys(schema: type) -> list[str]:
    """Keys whose field no module of satfuse (config.py aside) reads as an attribute: a key
    that does nothing is a bug. A lower bound: a common name (`name`, `seed`) read elsewhere passes."""
    code = "\n".join(p.read_text() for p in SRC.rglob("*.py") if p.name != "config.py")
    return [k for k in leaf_keys(schema) if not re.search(rf"\.{k.rsplit('.', 1)[-1]}\b", code)]


def test_every_config_key_is_read() -> None:
    from satfuse.config import PretrainConfig
    from satfuse.evaluation.finetune import FinetuneConfig

    @dataclasses.dataclass
    class Planted:
        never_read_by_satfuse: int = 0

    assert unread_keys(Planted) == ["never_read_by_satfuse"]  # the check can fail
    assert unread_keys(PretrainConfig) == [] and unread_keys(FinetuneConfig) == []
