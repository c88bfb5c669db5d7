"""The ready-made files in accelerate_configs/: each says when to use it, and the GPU files load
with Accelerate's own loader. (Launching the CPU and multi-node files for real:
``tests/multiprocess/test_accelerate_launch.py``.)"""

from __future__ import annotations

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from helpers import ROOT

CONFIGS = ROOT / "accelerate_configs"

# file -> (distributed_type, mixed_precision, num_machines)
GPU_CONFIGS = {
    "single_gpu.yaml": (DistributedType.NO, "bf16", 1),
    "multi_gpu_bf16.yaml": (DistributedType.MULTI_GPU, "bf16", 1),
    "multi_gpu_fp16.yaml": (DistributedType.MULTI_GPU, "fp16", 1),
    "multi_node.yaml": (DistributedType.MULTI_GPU, "bf16", 2),
}


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
