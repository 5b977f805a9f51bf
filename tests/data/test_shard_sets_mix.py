"""Mixing shard sets (`data.shards=[a, b]`, `data.shard_weights`): weighted shares of every
epoch, seeded and resumable like one set; bands must agree, the crop must fit every set,
normalisation stats are pooled count-weighted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from satfuse.config import PretrainConfig, load_config
from satfuse.data.reading.pretrain_loader import PretrainLoader
from satfuse.data.reading.shard_sets import resolve_shards
from satfuse.utils import SatfuseError
from tests.data.loader_shards import data_cfg, make_shards, run_rank, sample_ids

B0 = 5000  # ids of set b start here: a row's id tells its set


@pytest.fixture
def two_sets(tmp_path: Path) -> tuple[str, str]:
    a = make_shards(tmp_path, [30, 30, 20, 40], name="a")  # 120 samples
    b = make_shards(tmp_path, [50, 30], name="b", first_id=B0)  # 80 samples
    return str(a), str(b)


def epoch_ids(ss, world: int, workers: int, seed: int, epochs: int, **kw) -> list[list[int]]:
    """ids[epoch] -> every id all ranks saw in that epoch."""
    out: list[list[int]] = [[] for _ in range(epochs)]
    for r in range(world):
        ld = PretrainLoader(ss, data_cfg(num_workers=workers, **kw), rank=r, world_size=world, seed=seed)
        for b in run_rank(ld, ld.steps_per_epoch * epochs):
            out[b["epoch"]] += sample_ids(b)
    return out


def test_weighted_mix_ratio_per_epoch_without_repeats(two_sets: tuple[str, str]) -> None:
    ss = resolve_shards(list(two_sets), weights=[0.25, 0.75])
    assert ss.mix is not None and ss.mix.shares(ss.counts) == [27, 80]  # b is used up first: E = 80 / 0.75
    ids = epoch_ids(ss, world=2, workers=1, seed=3, epochs=3)
    a_seen = []
    for per_epoch in ids:
        assert len(per_epoch) == len(set(per_epoch)), "a sample was repeated within an epoch"
        a = [i for i in per_epoch if i < B0]
        assert abs(len(a) / len(per_epoch) - 0.25) < 0.06
        a_seen.append(set(a))
    assert a_seen[0] != a_seen[1], "set a must give a different subset every epoch"
    # unweighted: every sample of both sets each epoch (up to the dropped last batches)
    plain = epoch_ids(resolve_shards(list(two_sets)), world=2, workers=1, seed=3, epochs=1)[0]
    assert len(plain) == len(set(plain)) and 200 - len(plain) < 2 * 1 * 2 * 4


def test_mix_is_seeded(two_sets: tuple[str, str]) -> None:
    ss = resolve_shards(list(two_sets), weights=[0.5, 0.5])
    first = epoch_ids(ss, world=1, workers=0, seed=1, epochs=1)
    assert first == epoch_ids(ss, world=1, workers=0, seed=1, epochs=1)
    assert first != epoch_ids(ss, world=1, workers=0, seed=2, epochs=1)


@pytest.mark.parametrize(("new_world", "stop"), [(2, 5), (3, 4)])
def test_mix_resume_exact_and_on_another_world_size(two_sets: tuple[str, str], new_world: int, stop: int) -> None:
    ss = resolve_shards(list(two_sets), weights=[0.7, 0.3])
    cfg = data_cfg(num_workers=1)
    old = [PretrainLoader(ss, cfg, rank=r, world_size=2, seed=7) for r in range(2)]
    steps = old[0].steps_per_epoch
    refs = [run_rank(PretrainLoader(ss, cfg, rank=r, world_size=2, seed=7), steps + 2) for r in range(2)]
    seen = [i for ld in old for b in run_rank(ld, stop) for i in sample_ids(b)]
    states = json.loads(json.dumps([ld.state_dict() for ld in old]))
    new = [PretrainLoader(ss, cfg, rank=r, world_size=new_world, seed=7) for r in range(new_world)]
    for ld in new:
        ld.load_state_dict(states)
    if new_world == 2:  # same world size: bitwise the batches the uninterrupted run delivers
        for r, ld in enumerate(new):
            for got, want in zip(run_rank(ld, steps + 2 - stop), refs[r][stop:], strict=True):
                assert got["key"] == want["key"] and torch.equal(got["s2"], want["s2"])
        return
    left = {ld.steps_this_epoch for ld in new}
    assert len(left) == 1
    n = left.pop()
    for ld in new:
        batches = run_rank(ld, n)
        assert all(b["epoch"] == 0 for b in batches)
        seen += [i for b in batches for i in sample_ids(b)]
    assert len(seen) == len(set(seen)), "a sample was repeated within the epoch after the resume"
    shares = ss.mix.shares(ss.counts)
    assert sum(shares) - len(seen) < 3 * 1 * 2 * 4
    assert abs(sum(i < B0 for i in seen) / len(seen) - 0.7) < 0.06
    with pytest.raises(SatfuseError, match="another shard set"):  # other weights: another plan, refused
        PretrainLoader(resolve_shards(list(two_sets), weights=[0.5, 0.5]), cfg, rank=0, world_size=2,
                       seed=7).load_state_dict(states)


def test_band_mismatch_is_refused_naming_both_sets(two_sets: tuple[str, str]) -> None:
    a, b = two_sets
    man = json.loads((Path(b) / "manifest.json").read_text())
    s2 = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12"]  # L2A: no B10
    man["bands"] = {"s1": ["VV", "VH"], "s2": s2}
    (Path(b) / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(SatfuseError) as err:
        resolve_shards([a, b])
    msg = str(err.value)
    assert "\n" not in msg and a in msg and b in msg and "s2 bands (B10" in msg


def test_crop_must_fit_the_smallest_patch(tmp_path: Path) -> None:
    a = make_shards(tmp_path, [8, 8], name="a", hw=16)
    b = make_shards(tmp_path, [8], name="b", hw=8, first_id=B0)
    ss = resolve_shards([str(a), str(b)])
    with pytest.raises(SatfuseError, match=rf"data.crop=12 is larger than the 8x8 patches of {b}.*data.crop <= 8"):
        PretrainLoader(ss, data_cfg(crop=12), rank=0, world_size=1, seed=0)
    assert PretrainLoader(ss, data_cfg(crop=8), rank=0, world_size=1, seed=0).steps_per_epoch == 6


def test_stats_pooled_count_weighted(tmp_path: Path) -> None:
    a = make_shards(tmp_path, [10], name="a")
    b = make_shards(tmp_path, [30], name="b", first_id=B0)
    man = json.loads((b / "manifest.json").read_text())
    man["stats"]["s1"] = {"mean": [-10.0, -16.0], "std": [2.0, 3.0], "min": [-20.0, -25.0], "max": [1.0, 2.0], "count": 3}
    (b / "manifest.json").write_text(json.dumps(man))
    ss = resolve_shards([str(a), str(b)])  # a: count 1 over 10 samples, b: count 3 over 30: equal pixels a sample
    s1 = ss.stats["s1"]
    assert np.allclose(s1["mean"], [0.25 * -12 + 0.75 * -10, 0.25 * -19 + 0.75 * -16])
    var0 = 0.25 * (16 + (-12 - s1["mean"][0]) ** 2) + 0.75 * (4 + (-10 - s1["mean"][0]) ** 2)
    assert np.isclose(s1["std"][0], var0**0.5) and s1["min"] == [-30.0, -35.0] and s1["max"] == [5.0, 2.0]
    ld = PretrainLoader(ss, data_cfg(), rank=0, world_size=1, seed=0)
    assert ld.normalization["mix"]["sets"] == [str(a), str(b)] and "count-weighted" in ld.normalization["mix"]["stats"]


def test_config_shape_and_bad_weights(two_sets: tuple[str, str]) -> None:
    a, b = two_sets
    cfg = load_config(PretrainConfig, overrides=[f"data.shards=[{a},{b}]", "data.shard_weights=[0.7,0.3]"])
    assert cfg.data.shards == [a, b] and cfg.data.shard_weights == [0.7, 0.3]
    assert load_config(PretrainConfig, overrides=[f"data.shards={a}"]).data.shards == a
    with pytest.raises(SatfuseError, match="2 weights for 3 sets"):
        resolve_shards([a, b, a + "/"], weights=[1, 2])
    with pytest.raises(SatfuseError, match="must be > 0"):
        resolve_shards([a, b], weights=[1, 0])
    with pytest.raises(SatfuseError, match="needs a list of shard sets"):
        resolve_shards(a, weights=[1.0])


def test_pretrain_mixes_two_sets_and_records_it(sen12ms_shards: Path, sen12ms_heldout: Path, tmp_path: Path) -> None:
    from tests.engines.ranks import logs, run_ranks

    run = tmp_path / "run"
    overrides = [f"data.shards=[{sen12ms_shards},{sen12ms_heldout}]", "data.shard_weights=[0.8,0.2]",
                 f"train.run_dir={run}", "train.steps=2", "checkpoint.every_steps=2"]
    assert run_ranks(1, overrides, tmp_path) == [0], logs(tmp_path)[-2000:]
    metas = [json.loads(p.read_text()) for p in run.rglob("*.json") if "normalization" in p.read_text()]
    assert metas, sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    mix = metas[0]["normalization"]["mix"]
    assert mix["sets"] == [str(sen12ms_shards), str(sen12ms_heldout)] and mix["weights"] == [0.8, 0.2]
