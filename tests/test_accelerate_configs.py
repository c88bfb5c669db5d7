"""The ready-made files in accelerate_configs/: GPU files load with Accelerate's own loader, the CPU
file really starts two ranks, and the multi-node file forms one group from per-node launchers.
(Training through cpu_2proc.yaml is exercised by the SLURM tests, whose CPU mode uses it.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from conftest import ROOT, check, free_port

CONFIGS = ROOT / "accelerate_configs"

# file -> (distributed_type, mixed_precision, num_machines)
GPU_CONFIGS = {
    "single_gpu.yaml": (DistributedType.NO, "bf16", 1),
    "multi_gpu_bf16.yaml": (DistributedType.MULTI_GPU, "bf16", 1),
    "multi_gpu_fp16.yaml": (DistributedType.MULTI_GPU, "fp16", 1),
    "multi_node.yaml": (DistributedType.MULTI_GPU, "bf16", 2),
}

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
CPU_ENV = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}


def probes(output: str) -> list[dict]:
    # two ranks share one pipe, so their lines can interleave: find each record, not each line
    return [json.loads(record) for record in re.findall(r"PROBE (\{[^}]*\})", output)]


def accelerate_launch(args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", *args]
    return subprocess.run(command, env=CPU_ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_every_config_says_when_to_use_it():
    files = sorted(CONFIGS.glob("*.yaml"))
    assert {f.name for f in files} == {*GPU_CONFIGS, "cpu_2proc.yaml"}
    for path in files:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and len(first) > 20, f"{path.name} must open with a comment saying when to use it"


@pytest.mark.parametrize("name", sorted(GPU_CONFIGS))
def test_gpu_config_loads_with_accelerates_loader(name):
    config = load_config_from_file(str(CONFIGS / name))
    distributed_type, mixed_precision, num_machines = GPU_CONFIGS[name]
    assert config.distributed_type == distributed_type
    assert config.mixed_precision == mixed_precision
    assert config.num_machines == num_machines
    assert config.use_cpu is False
    if distributed_type == DistributedType.MULTI_GPU:
        # The GPU count comes from the command line (or SLURM), never from a guess in the file.
        assert config.num_processes == -1 and config.gpu_ids == "all"


@pytest.mark.multiprocess
def test_cpu_config_starts_two_gloo_ranks_in_one_group(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    result = check(accelerate_launch(["--config_file", str(CONFIGS / "cpu_2proc.yaml"), str(probe)]))
    seen = probes(result.stdout)
    assert sorted(p["rank"] for p in seen) == [0, 1], result.stdout
    assert all(p["world"] == 2 and p["sum"] == 3 and p["type"] == "DistributedType.MULTI_CPU" for p in seen)


@pytest.mark.multiprocess
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
