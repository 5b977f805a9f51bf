"""Old parameter names -> current ones, applied wherever saved weights are read.

Why: the ResNet stem was once an `nn.Sequential` called `stem` (`stem.0` = conv, `stem.1` =
BatchNorm); it now uses torchvision's names (`conv1`, `bn1`) so exported weights load into
torchvision/timm unchanged. Checkpoints and exports written before keep loading:

- plain `load_state_dict` (fine-tuning from an old export, DeepSpeed module states): the
  ResNet's load pre-hook renames its own keys;
- DCP checkpoints (resume, `satfuse ckpt export`): `upgrade_metadata` renames the tensor
  names in the checkpoint's `.metadata` as it is read, so DCP's planner matches them to the
  model's current names; `upgrade_optim_state` renames the parameter names inside the
  optimizer's pickled `param_groups`; `upgrade_fingerprint` renames meta.json's fingerprint.

A rename matches whole dotted components only (`backbone_s1.stem.0.weight`,
`model_optim.optim.state.backbone_s2.stem.1.bias.exp_avg`), never a substring of a name.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from torch.distributed.checkpoint.metadata import MetadataIndex

# (old component sequence, new component sequence), matched at dot boundaries
RENAMES: tuple[tuple[str, str], ...] = (("stem.0", "conv1"), ("stem.1", "bn1"))
_PATTERNS = [(re.compile(rf"(^|\.){re.escape(old)}(?=\.|$)"), new) for old, new in RENAMES]


def upgrade_key(name: str) -> str:
    """`name` with old component names replaced by the current ones (unchanged if none)."""
    for pattern, new in _PATTERNS:
        name = pattern.sub(lambda m, new=new: m.group(1) + new, name)
    return name


def has_legacy_keys(names: Any) -> bool:
    """True when any of `names` uses an old name."""
    return any(upgrade_key(str(n)) != str(n) for n in names)


def upgrade_state_dict(sd: dict[str, Any]) -> dict[str, Any]:
    """A copy of a flat state dict with upgraded keys (values untouched)."""
    return {upgrade_key(k): v for k, v in sd.items()}


def upgrade_fingerprint(fp: dict[str, Any] | None) -> dict[str, Any] | None:
    """meta.json's {name: shape} with upgraded names (None stays None)."""
    return None if fp is None else {upgrade_key(k): v for k, v in fp.items()}


def upgrade_optim_state(osd: dict[str, Any]) -> dict[str, Any]:
    """An FQN-keyed optimizer state dict (`get_state_dict`'s) with upgraded names: the keys of
    `state` and the names listed in each param group's `params`."""
    if not isinstance(osd, dict):
        return osd
    out = dict(osd)
    if isinstance(osd.get("state"), dict):
        out["state"] = {upgrade_key(k) if isinstance(k, str) else k: v for k, v in osd["state"].items()}
    if isinstance(osd.get("param_groups"), list):
        out["param_groups"] = [
            {**g, "params": [upgrade_key(p) if isinstance(p, str) else p for p in g.get("params", [])]}
            if isinstance(g, dict) else g
            for g in osd["param_groups"]
        ]
    return out


def upgrade_metadata(metadata: Any) -> Any:
    """A DCP `Metadata` with upgraded tensor names (the object itself when nothing is old)."""
    if not has_legacy_keys(metadata.state_dict_metadata):
        return metadata
    sd_meta = {upgrade_key(k): v for k, v in metadata.state_dict_metadata.items()}
    storage = metadata.storage_data
    if isinstance(storage, dict):
        storage = {
            (MetadataIndex(upgrade_key(k.fqn), k.offset, k.index) if isinstance(k, MetadataIndex) else k): v
            for k, v in storage.items()
        }
    planner = metadata.planner_data
    if isinstance(planner, dict):
        planner = {
            upgrade_key(k): tuple(upgrade_key(p) if isinstance(p, str) else p for p in path)
            if isinstance(path, tuple) else path
            for k, path in planner.items()
        }
    return dataclasses.replace(metadata, state_dict_metadata=sd_meta, storage_data=storage,
                               planner_data=planner)
