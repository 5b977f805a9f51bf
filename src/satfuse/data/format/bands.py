"""Which bands a shard set holds, and the model input channels that follow from them.

Why a module of its own: the band set is a contract between three parties that are built
at different times - the shard set (`manifest.json` -> `bands`), the model (its first conv
has one input channel per band) and a checkpoint (its `normalization` records the bands it
was trained on). SEN12MS/DFC2020 shard sets written before band names were recorded have
no `bands` key: they hold the 13 L1C bands and VV/VH, in the order of `normalize.S2_BANDS`.
BigEarthNet and SSL4EO-S12 L2A have no B10, so their S2 has 12 bands.
"""

from __future__ import annotations

from typing import Any

from satfuse.data.packing.normalize import S1_BANDS, S2_BANDS
from satfuse.utils import SatfuseError

SENSORS = ("s1", "s2")


def manifest_bands(manifest: dict[str, Any], where: str = "manifest.json") -> dict[str, list[str]]:
    """The band names per sensor of a shard set (the SEN12MS default when unrecorded)."""
    bands = manifest.get("bands")
    if bands is None:
        return {"s1": list(S1_BANDS), "s2": list(S2_BANDS)}
    if not isinstance(bands, dict) or any(not isinstance(bands.get(s), list) or not bands[s] for s in SENSORS):
        raise SatfuseError(f"{where}: 'bands' must map s1 and s2 to non-empty lists of band names (got {bands!r}); re-shard with `satfuse shard`")
    return {s: [str(b) for b in bands[s]] for s in SENSORS}


def channels(bands: dict[str, list[str]]) -> dict[str, int]:
    """Model input channels per sensor: one per band."""
    return {s: len(bands[s]) for s in SENSORS}


def normalization_bands(normalization: dict[str, Any] | None) -> dict[str, list[str]] | None:
    """The band names a checkpoint was trained on, from its `normalization` record.

    Checkpoints written before band names were recorded stored `"bands": 13` for S2 (always
    the 13 SEN12MS bands then); None when the checkpoint has no normalization at all.
    """
    if not isinstance(normalization, dict):
        return None
    out: dict[str, list[str]] = {}
    for sensor, default in (("s1", S1_BANDS), ("s2", S2_BANDS)):
        value = (normalization.get(sensor) or {}).get("bands")
        if isinstance(value, list):
            out[sensor] = [str(b) for b in value]
        elif value == len(default) or value is None:
            out[sensor] = list(default)
        else:
            raise SatfuseError(f"checkpoint normalization.{sensor}.bands={value!r} is neither a list of band names nor {len(default)}")
    return out


def check_same_bands(checkpoint: dict[str, list[str]], shards: dict[str, list[str]], checkpoint_name: str, shards_name: str) -> None:
    """Refuse a checkpoint whose band set differs from the shard set's, naming both."""
    for sensor in SENSORS:
        if checkpoint[sensor] != shards[sensor]:
            raise SatfuseError(
                f"band mismatch: checkpoint {checkpoint_name} was trained on {sensor} bands {checkpoint[sensor]} "
                f"({len(checkpoint[sensor])}), the shard set {shards_name} holds {shards[sensor]} ({len(shards[sensor])}); "
                "train on shards with the checkpoint's bands or start a new run (another train.run_dir)"
            )
