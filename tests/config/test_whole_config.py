"""Each component receives its own config sections (issue 15, item 5): only the places that
split a command's config into sections (or record all of it) take the whole config."""

from __future__ import annotations

import ast
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
