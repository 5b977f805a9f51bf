"""satfuse.evaluation: downstream evaluation on a registered benchmark, DFC2020 by default
(the paper's tables and plot).

- `benchmark`: the `Benchmark` contract (classes, label members, tasks, metrics) and lookup.
- `dfc2020`: the DFC2020 benchmark (registered `dfc2020`); `bigearthnet19` BigEarthNet-19
  (multi-label, `bigearthnet19`); `sen12ms_igbp` SEN12MS scene classification (`sen12ms-igbp`).
- `targets`: DFC/IGBP label maps -> the authors' 8 classes, single- and multi-label targets.
- `data`: a benchmark's shards in memory, early-stopping hold-out, nested stratified label fractions.
- `models`: backbone(s) + one Linear head; S1 / S2 / early / late fusion; linear or fine-tune.
- `pretrained`: exported backbones or checkpoint directories, checked against the config.
- `metrics`: OA / AA / F1 and multi-label F1, P, R, mAP (scikit-learn).
- `finetune`: `FinetuneConfig`, `run_finetune(cfg) -> dict` (writes RUN_DIR/result.json).
- `probe_cache`: linear probes on frozen features cached once per checkpoint and shard set.
- `sweep`: `SweepConfig`, `run_sweep(cfg) -> list[Path]` (methods x fractions x seeds x tasks).
- `report`: `make_report(runs, out) -> dict` (table.md, label_fractions.png, summary.json; per benchmark).

Submodules are imported on use so that `satfuse --help` does not pay for torch/sklearn.
"""
