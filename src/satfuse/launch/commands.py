"""`satfuse submit pretrain|shard` and `satfuse jobs ls|status|logs|cancel RUN`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# CLI flag -> ClusterProfile field (None when not given: the profile's value stays)
PROFILE_FLAGS: dict[str, tuple[str, type]] = {
    "--nodes": ("nodes", int),
    "--gpus-per-node": ("gpus_per_node", int),
    "--tasks-per-node": ("tasks_per_node", int),
    "--cpus-per-task": ("cpus_per_task", int),
    "--mem-gb": ("mem_gb", float),
    "--time": ("time", str),
    "--partition": ("partition", str),
    "--account": ("account", str),
    "--qos": ("qos", str),
    "--constraint": ("constraint", str),
    "--exclude": ("exclude", str),
    "--signal": ("signal", str),
    "--signal-delay-s": ("signal_delay_s", int),
}


def register(sub: argparse._SubParsersAction) -> None:
    _register_submit(sub)
    _register_jobs(sub)


# --------------------------------------------------------------------------------------------
# submit
# --------------------------------------------------------------------------------------------


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", required=True,
                   help="cluster profile: a name (e.g. example, local; see `satfuse configs`) or a YAML path")
    g = p.add_argument_group("cluster profile overrides")
    for flag, (dest, tp) in PROFILE_FLAGS.items():
        g.add_argument(flag, dest=f"prof_{dest}", type=tp, default=None, metavar=dest.split("_")[0].upper(),
                       help=f"overrides `{dest}`")
    p.add_argument("--dry-run", action="store_true",
                   help="print the sbatch script that would be submitted; queue nothing")
    p.add_argument("--wait", action="store_true", help="block until the job (or the merge) has finished")


def _register_submit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="submit pretraining or sharding to SLURM (or locally) via submitit")
    ss = p.add_subparsers(dest="submit_command", metavar="KIND", required=True)
    pre = ss.add_parser("pretrain", help="one task per GPU (or CPU worker), requeued on preemption",
                        description="e.g. satfuse submit pretrain --config hpc/pretrain/dual_simclr.yaml "
                        "--cluster example --nodes 2 --gpus-per-node 4 train.steps=10000")
    pre.add_argument("--config", default=None, help="pretraining YAML path or packaged name (`satfuse configs`)")
    _cluster_args(pre)
    pre.add_argument("--entry", default=None, help=argparse.SUPPRESS)  # module:function, for tests
    pre.add_argument("overrides", nargs="*", help="key=value config overrides")
    pre.set_defaults(func=cmd_submit_pretrain)

    sh = ss.add_parser("shard", help="the sharding tool as a job array + a dependent merge job")
    sh.add_argument("--src", required=True, help="raw dataset root")
    sh.add_argument("--dataset", default="sen12ms", help="dataset layout (sen12ms, dfc2020)")
    sh.add_argument("--out", required=True, help="output shard directory")
    sh.add_argument("--array-size", type=int, required=True, help="number of array tasks (disjoint parts)")
    sh.add_argument("--maxcount", type=int, default=None, help="samples per shard")
    sh.add_argument("--workers", type=int, default=None, help="worker processes per task")
    sh.add_argument("--seed", type=int, default=None)
    sh.add_argument("--compress", choices=["zstd", "lz4"], default=None, help="as `satfuse shard --compress`")
    sh.add_argument("--compress-level", type=int, default=None, help="as `satfuse shard --compress-level`")
    sh.add_argument("--s1-dtype", choices=["float32", "float16"], default=None, help="as `satfuse shard --s1-dtype`")
    sh.add_argument("--no-labels", action="store_true", help="as `satfuse shard --no-labels`")
    sh.add_argument("--overwrite", action="store_true",
                    help="replace what --out holds: emptied once here, before the parts are queued")
    sh.add_argument("--run-dir", default=None, help="where jobs.json and the submitit folder go "
                    "(default runs/shard-<out name>)")
    _cluster_args(sh)
    sh.set_defaults(func=cmd_submit_shard)


def _profile(args: argparse.Namespace) -> tuple[Any, str]:
    from satfuse.launch.cluster import load_profile

    flags = {dest: getattr(args, f"prof_{dest}") for dest, _ in PROFILE_FLAGS.values()}
    return load_profile(args.cluster, flags)


def cmd_submit_pretrain(args: argparse.Namespace) -> int:
    from satfuse.engines.commands import normalise_overrides
    from satfuse.launch.submit import print_submission, submit_pretrain
    from satfuse.launch.task import DEFAULT_ENTRY

    profile, where = _profile(args)
    sub = submit_pretrain(args.config, normalise_overrides(args.overrides), profile, where,
                          dry_run=args.dry_run, wait=args.wait, entry=args.entry or DEFAULT_ENTRY)
    return print_submission(sub)


def cmd_submit_shard(args: argparse.Namespace) -> int:
    from satfuse.data.format.codecs import make_encoding
    from satfuse.launch.submit import default_shard_run_dir, print_submission, submit_shard
    from satfuse.launch.task import ShardPart

    profile, where = _profile(args)
    encoding = {"compress": args.compress, "level": args.compress_level, "s1_dtype": args.s1_dtype,
                "no_labels": args.no_labels}
    make_encoding(**encoding)  # a bad flag fails here, not in every array task
    part = ShardPart(src=str(Path(args.src).resolve()), dataset=args.dataset,
                     out=str(Path(args.out).resolve()), num_shards=args.array_size,
                     maxcount=args.maxcount, workers=args.workers, seed=args.seed,
                     encoding={k: v for k, v in encoding.items() if v} or None)
    run_dir = Path(args.run_dir) if args.run_dir else default_shard_run_dir(args.out)
    sub = submit_shard(part, args.array_size, run_dir, profile, where, dry_run=args.dry_run, wait=args.wait,
                       overwrite=args.overwrite)
    return print_submission(sub)


# --------------------------------------------------------------------------------------------
# jobs
# --------------------------------------------------------------------------------------------


TRUST_HELP = ("also unpickle submitit's result files of jobs that have no satfuse outcome record (older runs): "
              "a pickle runs code when loaded, so only for a run dir whose writers you trust")


def _register_jobs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("jobs", help="the jobs of a run: ls, status, logs, cancel")
    js = p.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    ls = js.add_parser("ls", help="one line per job: id, kind, state")
    ls.add_argument("run", help="run directory (or a name under runs/)")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    ls.set_defaults(func=cmd_jobs_ls)
    st = js.add_parser("status", help="jobs with SLURM details and the run's progress (JSON)")
    st.add_argument("run")
    st.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    st.set_defaults(func=cmd_jobs_status)
    lg = js.add_parser("logs", help="a task's log (appended across requeues)")
    lg.add_argument("run")
    lg.add_argument("--job", default=None, help="job id (default: the last submitted)")
    lg.add_argument("--task", type=int, default=0, help="task (rank) number")
    lg.add_argument("--stdout", action="store_true", help="stdout instead of stderr")
    lg.add_argument("--tail", type=int, default=0, help="only the last N lines")
    lg.set_defaults(func=cmd_jobs_logs)
    ca = js.add_parser("cancel", help="cancel the run's queued/running jobs")
    ca.add_argument("run")
    ca.add_argument("--job", default=None, help="only this job id")
    ca.set_defaults(func=cmd_jobs_cancel)


def cmd_jobs_ls(args: argparse.Namespace) -> int:
    from satfuse.launch import jobs

    rows = jobs.list_jobs(jobs.resolve_run(args.run), args.trust_checkpoint)
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return 0
    for r in rows:
        sys.stdout.write(f"{r['job_id']:<14} {r['kind']:<9} {r['executor']:<6} {r.get('tasks', '?'):>3} "
                         f"{r['state']:<24} {r.get('submitted', '')}\n")
        if r.get("hint"):
            sys.stdout.write(f"  -> {r['hint']}\n")
    return 0


def cmd_jobs_status(args: argparse.Namespace) -> int:
    from satfuse.launch import jobs

    sys.stdout.write(json.dumps(jobs.status(jobs.resolve_run(args.run), args.trust_checkpoint), indent=2, default=str) + "\n")
    return 0


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    from satfuse.launch import jobs

    run = jobs.resolve_run(args.run)
    entry = jobs.select(run, args.job)
    text = jobs.log_text(entry, args.task, "stdout" if args.stdout else "stderr", args.tail, run)
    sys.stdout.write(text + ("\n" if text else ""))
    return 0


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    from satfuse.launch import jobs

    report = jobs.cancel_report(jobs.resolve_run(args.run), args.job)
    for key in ("gone", "elsewhere"):
        if not report[key]:
            del report[key]
    sys.stdout.write(json.dumps(report) + "\n")
    return 0
