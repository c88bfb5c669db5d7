"""The ready-made accelerate configs launch for real: the CPU file starts two ranks, and the
multi-node file forms one group from per-node launchers. (Training through cpu_2proc.yaml is
exercised by the SLURM tests, whose CPU mode uses it.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from helpers import ROOT, check, free_port

pytestmark = pytest.mark.multiprocess

CONFIGS = ROOT / "accelerate_configs"

# Prints what this process sees of the group, after one all-reduce across it.
# Prints what this process sees of the group, after one all-reduce across it.
PROBE = """
import json, torch
from accelerate import Accelerator
accelerator = Accelerator()
total = accelerator.reduce(torch.tensor([accelerator.process_index + 1]), reduction="sum").item()
print("PROBE " + json.dumps({"rank": accelerator.process_index, "world": accelerator.num_processes,
      "type": str(accelerator.distributed_type), "sum": total}), flush=True)
accelerator.wait_for_everyone()
accelerator.end_training()  # tear the gloo group down before exit: a rank leaving mid-teardown aborts
"""


# As the YAML comments document: the CPU path needs ACCELERATE_USE_CPU=true.
# As the YAML comments document: the CPU path needs ACCELERATE_USE_CPU=true.
CPU_ENV = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}


def probes(output: str) -> list[dict]:
    # two ranks share one pipe, so their lines can interleave: find each record, not each line
    return [json.loads(record) for record in re.findall(r"PROBE (\{[^}]*\})", output)]


def accelerate_launch(args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", *args]
    return subprocess.run(command, env=CPU_ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cpu_config_starts_two_gloo_ranks_in_one_group(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    result = check(accelerate_launch(["--config_file", str(CONFIGS / "cpu_2proc.yaml"), str(probe)]))
    seen = probes(result.stdout)
    assert sorted(p["rank"] for p in seen) == [0, 1], result.stdout
    assert all(p["world"] == 2 and p["sum"] == 3 and p["type"] == "DistributedType.MULTI_CPU" for p in seen)


def test_multi_node_config_joins_one_launcher_per_node_into_one_group(tmp_path):
    """Two launchers on this machine stand in for two nodes; each gets its own --machine_rank."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    port = free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                str(CONFIGS / "multi_node.yaml"),
                "--num_machines",
                "2",
                "--num_processes",
                "2",
                "--machine_rank",
                str(rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                str(port),
                "--mixed_precision",
                "no",
                str(probe),
            ],
            env=CPU_ENV,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=180)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    seen = []
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-4000:]
        seen += probes(output)
    assert sorted(p["rank"] for p in seen) == [0, 1]
    assert all(p["world"] == 2 and p["sum"] == 3 and p["type"] == "DistributedType.MULTI_CPU" for p in seen)
