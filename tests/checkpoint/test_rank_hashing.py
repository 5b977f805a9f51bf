"""Each rank hashes the files it wrote: a 2-rank save of the DeepSpeed backend (its file names,
written by a stand-in for DeepSpeed's `save_checkpoint`, so DeepSpeed itself is not started)
where rank 0 reads none of rank 1's files, and meta.json still lists and verifies them all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from satfuse.checkpoint.layout import checkpoint_problems, read_meta
from satfuse.distributed.ports import free_port

ROOT = Path(__file__).resolve().parents[2]

RANK = r"""
import json, sys
from pathlib import Path
import torch.distributed as dist
from torch import nn
import satfuse.checkpoint.layout as layout
import satfuse.checkpoint.protocol as protocol
from satfuse.checkpoint.deepspeed_backend import DeepSpeedCheckpointManager
from satfuse.checkpoint.state import ModelOptimState

dist.init_process_group("gloo")
me = dist.get_rank()
hashed = []
crc32_file = layout.crc32_file
def counting_crc32(path, *args):
    hashed.append(Path(path).name)
    return crc32_file(path, *args)
layout.crc32_file = counting_crc32  # every read-back hash (protocol.file_record) goes through it

class StandIn:  # DeepSpeed's save_checkpoint file names, one optimizer shard per rank
    def save_checkpoint(self, save_dir, tag, save_latest):
        d = Path(save_dir) / tag
        (d / f"bf16_zero_pp_rank_{me}_mp_rank_00_optim_states.pt").write_bytes(bytes([me]) * 64)
        if me == 0:
            (d / "mp_rank_00_model_states.pt").write_bytes(b"m" * 32)
            (d / "zero_to_fp32.py").write_text("# recovery script\n")
        dist.barrier()  # as DeepSpeed's save_checkpoint ends

class Engine:
    module = nn.Linear(2, 2)
    model = StandIn()
    def describe(self):
        return {"zero_stage": 1}

engine = Engine()
mgr = DeepSpeedCheckpointManager(Path(sys.argv[1]), engine, timeout_s=60)
path = mgr.save(1, {"model_optim": ModelOptimState(engine.module)}, {"step": 1}, {})
Path(sys.argv[2], f"rank{me}.json").write_text(json.dumps({"hashed": hashed, "path": str(path)}))
from satfuse.distributed.env import exit_cleanly
exit_cleanly(0)  # the OS frees the group: destroying a 2-rank gloo group can hang
"""


def test_each_deepspeed_rank_hashes_only_its_own_files(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(tmp_path / "run"), str(tmp_path)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    shard = "bf16_zero_pp_rank_{}_mp_rank_00_optim_states.pt"
    assert sorted(r0["hashed"]) == sorted([shard.format(0), "mp_rank_00_model_states.pt", "zero_to_fp32.py"])
    assert r1["hashed"] == [shard.format(1)]  # its shard, read back by the rank that wrote it
    path = Path(r0["path"])
    assert sorted(read_meta(path)["files"]) == sorted([shard.format(0), shard.format(1), "mp_rank_00_model_states.pt",
                                                      "rank_00000.pt", "rank_00001.pt", "zero_to_fp32.py"])
    assert checkpoint_problems(path) == []
