"""Fine-tuning from plain backbone weights, e.g. torchvision-named ResNets (not a satfuse export).

What is accepted as `model.checkpoint` besides satfuse's own export:
- `{"s1": state_dict, "s2": state_dict}` (what `satfuse ckpt export --format torchvision`
  writes; any of the input names s1, s2, s2_rgb, s1s2 as keys);
- a `.safetensors` file whose keys are `<modality>.<torchvision name>` (`--format safetensors`);
- the authors' Dual-SimCLR release, `{"state_dict": {"backbone1.<name>": ..., "backbone2.<name>": ...}, ...}`
  (backbone1 = S1, backbone2 = S2; their projection heads `fc.*` are dropped);
- one flat state dict (e.g. ImageNet weights whose conv1 was adapted to 13 bands): its
  modality is `model.checkpoint_modality`, or else the one whose channel count its conv1 has.

`fc.*` (a classifier or projection head) is dropped with a log line. The architecture is the
registered backbone that says the tensors are its own (`Backbone.owns_state_dict`), and every
tensor is compared with the configured backbone: a mismatch is refused naming the tensor and both shapes.
Normalisation: `model.normalization` (a JSON file), else the safetensors metadata, else the
`.normalization.json` written beside the weights by the export; with none of them the
fine-tuning run standardises with the training shards' statistics (and says so). The side
file is only trusted when it names these weights: `X.pt` and `X.safetensors` share
`X.normalization.json`, so a later export of another run under the other suffix replaces it;
a side file whose `weights` name (or, beside a .safetensors, whose `source`) differs is
refused naming both, never used quietly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from satfuse.checkpoint.layout import normalization_path
from satfuse.evaluation.models import CHANNELS_TO_INPUT, INPUT_CHANNELS
from satfuse.evaluation.pretrained import PretrainedBackbones, load_pretrained
from satfuse.models.backbones import backbone_class, build_backbone, identify_state_dict
from satfuse.models.legacy import upgrade_state_dict
from satfuse.models.resnet import describe_resnet
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

AUTHORS_PREFIXES = {"backbone1": "s1", "backbone2": "s2"}


def load_for_finetune(checkpoint: str, backbone: str, modality: str = "",
                      normalization: str = "", trust: bool = False, img_size: int | None = None) -> PretrainedBackbones:
    """`model.checkpoint` as PretrainedBackbones: satfuse exports/checkpoints via
    `load_pretrained`, plain torchvision/timm-named weights here (checked against `backbone`
    built for crops of `img_size`)."""
    p = Path(checkpoint)
    raw: Any = None
    embedded: dict | None = None
    if p.is_file() and p.suffix == ".safetensors":
        raw, embedded = _read_safetensors(p)
    elif p.is_file():
        try:
            raw = torch.load(p, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - let load_pretrained report it in its words
            raw = None
        if isinstance(raw, dict) and "format" in raw:
            raw = None  # a satfuse export
    if raw is None:
        pre = load_pretrained(checkpoint, trust=trust)
        if normalization:
            pre.normalization = read_normalization(Path(normalization))
        return pre
    sds = split_modalities(raw, str(p), modality, backbone_class(backbone).input_weight)
    arch, adapted = {}, []
    for name in sds:
        sds[name], arch[name], notes = check_architecture(sds[name], backbone, name, str(p), img_size)
        adapted += [f"{name}: {n}" for n in notes]
    doc, norm = _normalization_for(p, embedded, normalization)
    method = str((embedded or {}).get("method") or (doc or {}).get("method") or "pretrained")
    if norm is None:
        log.warning("%s: no normalisation given (model.normalization) or found beside it; "
                    "inputs are standardised with the training shards' statistics", p)
    return PretrainedBackbones(
        method=method, backbone=backbone, in_channels=arch, state_dicts=sds,
        normalization=norm, step=-1, source=str(p), path=str(p), adapted=adapted)


def _normalization_for(p: Path, embedded: dict | None, normalization: str) -> tuple[dict | None, dict | None]:
    """(the document the normalisation came from, the normalisation) of the weights `p`:
    `model.normalization`, else the safetensors metadata (`embedded`), else the side file.

    Why the side file is checked even when the metadata wins: one that names other weights
    or another source run means two exports were mixed up in one place, and a later reader
    of the plain `.pt` would take it; the user decides which one is right."""
    if normalization:
        path = Path(normalization)
        norm = read_normalization(path)
        doc = json.loads(path.read_text())
        return (doc if isinstance(doc, dict) else None), norm
    beside = normalization_path(p)
    side = _side_document(beside) if beside.is_file() else None
    if side is not None:
        want = {"weights": (embedded or {}).get("weights") or p.name}
        if embedded is not None:
            want["source"] = embedded.get("source")
        differ = [f"{k} {side.get(k)!r} (this file: {v!r})" for k, v in want.items()
                  if side.get(k) is not None and v is not None and str(side[k]) != str(v)]
        if differ:
            raise SatfuseError(
                f"{beside}: belongs to another export than {p} ({'; '.join(differ)}); remove or "
                "rename it, re-export both, or pass the right one as model.normalization=FILE")
    if embedded is not None:
        log.info("%s: normalisation from its safetensors metadata", p)
        return embedded, embedded.get("normalization")
    if side is not None:
        log.info("%s: normalisation from %s", p, beside)
        return side, read_normalization(beside)
    return None, None


def _side_document(path: Path) -> dict:
    """The export's `.normalization.json` beside the weights, as a dict (refused if unreadable)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SatfuseError(f"{path}: not a readable JSON file ({exc}); remove it or re-export the weights") from None
    if not isinstance(doc, dict):
        raise SatfuseError(f"{path}: not a JSON object; remove it or re-export the weights")
    return doc


def _read_safetensors(p: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict | None]:
    """(tensors, nested by modality when every key is `<modality>.<name>`; the satfuse
    document of its metadata (normalisation, weights, source, method) or None)."""
    try:
        with safe_open(str(p), framework="pt") as fh:
            flat = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no iterator
            meta = fh.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - any parse failure: a bad file
        raise SatfuseError(f"{p}: not a readable .safetensors file ({exc.__class__.__name__}); re-export it") from None
    nested: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in flat.items():
        head, _, rest = k.partition(".")
        nested.setdefault(head, {})[rest] = v
    doc = None
    if meta.get("satfuse_normalization"):
        try:
            doc = json.loads(meta["satfuse_normalization"])
        except json.JSONDecodeError:
            raise SatfuseError(f"{p}: its satfuse_normalization metadata is not JSON; re-export it") from None
        if not isinstance(doc, dict):
            raise SatfuseError(f"{p}: its satfuse_normalization metadata is not a JSON object; re-export it")
    return nested if all(k in INPUT_CHANNELS for k in nested) else flat, doc


def read_normalization(path: Path) -> dict:
    """{"s1": {"mean", "std", "clip"}, "s2": {...}}, from that dict itself or from the JSON
    that `satfuse ckpt export --format torchvision` writes (under "normalization")."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SatfuseError(f"model.normalization={path}: not a readable JSON file ({exc}); pass "
                           "the .normalization.json written beside the exported weights") from None
    norm = doc.get("normalization", doc) if isinstance(doc, dict) else None
    if not isinstance(norm, dict) or not {"s1", "s2"} <= set(norm):
        raise SatfuseError(f"model.normalization={path}: needs 's1' and 's2' entries with mean, "
                           "std and clip per band")
    for s in ("s1", "s2"):
        missing = [k for k in ("mean", "std", "clip") if k not in (norm[s] or {})]
        if missing:
            raise SatfuseError(f"model.normalization={path}: {s} lacks {', '.join(missing)}")
    return norm


def _is_tensor_dict(d: Any) -> bool:
    return isinstance(d, dict) and bool(d) and all(torch.is_tensor(v) for v in d.values())


def split_modalities(raw: Any, where: str, modality: str = "", input_weight: str = "conv1.weight"
                     ) -> dict[str, dict[str, torch.Tensor]]:
    """{modality: state dict without fc.*} from any accepted layout (see the module doc);
    `input_weight`: the tensor whose band count names a flat state dict's modality (the
    configured backbone's `Backbone.input_weight`)."""
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]  # the authors' {"epoch", "arch", "state_dict", "optimizer"}
    if not isinstance(raw, dict) or not raw:
        raise SatfuseError(f"{where}: not a state dict (got {type(raw).__name__}); pass a "
                           "torchvision-named ResNet state dict or a satfuse export")
    if all(_is_tensor_dict(v) for v in raw.values()):
        bad = [k for k in raw if k not in INPUT_CHANNELS]
        if bad:
            raise SatfuseError(f"{where}: modality keys {bad} unknown; expected some of {list(INPUT_CHANNELS)}")
        sds = {k: dict(v) for k, v in raw.items()}
    elif _is_tensor_dict(raw):
        heads = {k.split(".", 1)[0] for k in raw}
        if heads <= set(AUTHORS_PREFIXES):
            sds = {AUTHORS_PREFIXES[h]: {k.split(".", 1)[1]: v for k, v in raw.items() if k.startswith(h + ".")}
                   for h in sorted(heads)}
        else:
            sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in raw.items()}
            name = modality or _modality_from_channels(sd, where, input_weight)
            if name not in INPUT_CHANNELS:
                raise SatfuseError(f"model.checkpoint_modality={name!r}: not one of {list(INPUT_CHANNELS)}")
            sds = {name: sd}
    else:
        raise SatfuseError(f"{where}: neither a state dict nor {{modality: state dict}}; pass a "
                           "torchvision-named ResNet state dict or a satfuse export")
    out = {}
    for name, sd in sds.items():
        dropped = sorted(k for k in sd if k.startswith("fc."))
        if dropped:
            log.info("%s: %s: dropping the head tensors %s", where, name, ", ".join(dropped))
        out[name] = upgrade_state_dict({k: v for k, v in sd.items() if not k.startswith("fc.")})
    return out


def _modality_from_channels(sd: dict[str, torch.Tensor], where: str, input_weight: str) -> str:
    w = sd.get(input_weight) if input_weight else None
    if w is None or w.dim() < 2:
        raise SatfuseError(f"{where}: no {input_weight or 'input-layer weight'} to read the band count from; "
                           "set model.checkpoint_modality to the input these weights take")
    ch = int(w.shape[1])
    if ch not in CHANNELS_TO_INPUT:
        raise SatfuseError(f"{where}: {input_weight} {tuple(w.shape)} takes {ch} channels, which no input "
                           f"provides ({INPUT_CHANNELS}); adapt it or set model.checkpoint_modality")
    return CHANNELS_TO_INPUT[ch]


def infer_architecture(sd: dict[str, torch.Tensor]) -> str:
    """The registered backbone whose tensors `sd` holds, else a description of what it is."""
    name = identify_state_dict(sd)
    if name is not None:
        return name
    return describe_resnet(sd) if "conv1.weight" in sd else "state dict of no registered backbone"


def check_architecture(sd: dict[str, torch.Tensor], backbone: str, name: str, where: str,
                       img_size: int | None = None) -> tuple[dict[str, torch.Tensor], int, list[str]]:
    """(`sd` in the layout of `backbone` built for the modality `name` and crops of `img_size`
    (`Backbone.adapt_state_dict`: timm/Microsoft names, position embeddings resampled), its
    input channels, what was changed to fit), after checking every tensor against that backbone; refuses naming the
    first differing tensor and both shapes."""
    want_ch = INPUT_CHANNELS[name]
    model = build_backbone(backbone, want_ch, img_size=img_size)
    sd, notes = model.adapt_state_dict(sd)
    for note in notes:
        log.info("%s: %s: %s", where, name, note)
    arch = infer_architecture(sd)
    if arch != backbone and identify_state_dict(sd) is None:
        raise SatfuseError(f"{where}: the {name} weights are a {arch}, the config has "
                           f"model.backbone={backbone}; pass weights of a {backbone}")
    if arch != backbone:
        raise SatfuseError(f"{where}: the {name} weights are a {arch}, the config has "
                           f"model.backbone={backbone}; set model.backbone={arch} or pass other weights")
    ref = model.state_dict()
    for k, v in ref.items():
        if k not in sd:
            raise SatfuseError(f"{where}: {name} weights lack {k} (model shape {tuple(v.shape)}); "
                               f"not a {backbone} state dict")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise SatfuseError(
                f"{where}: {name} tensor {k} has shape {tuple(sd[k].shape)} in the checkpoint but "
                f"{tuple(v.shape)} in a {backbone} for {name} ({want_ch} bands); adapt the weights "
                "(e.g. conv1 to the band count) or set model.checkpoint_modality")
    extra = sorted(set(sd) - set(ref))
    if extra:
        raise SatfuseError(f"{where}: {name} weights have tensors a {backbone} lacks: "
                           f"{', '.join(extra[:5])}; strip them (only fc.* is dropped)")
    return sd, want_ch, notes
