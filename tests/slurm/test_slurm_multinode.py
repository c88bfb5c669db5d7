"""Two real nodes on one machine: ``slurm/local_cluster.sh up --nodes 2``.

Each node is a network namespace with its own address on a bridge and runs its own slurmd, so a
job on both nodes has 4 ranks (2 CPU processes per node) whose rendezvous and gloo collectives
cross between the namespaces: loopback does not connect them, only the nodes' addresses do.
The session fixture starts the cluster in a temporary directory and always takes it down; the
tests skip without root, SLURM or iproute2. ``tests/scripts/node_hooks`` (on the jobs' PYTHONPATH)
pauses rank 0 at a chosen step, so that a signal lands mid-epoch, and delays one node's exit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY, free_port, make_image_folder
from safetensors.torch import load_file
from slurm_jobs import FINISHED, SLURM, job_info, output_of, submit, wait_for

from anemia_dist.checkpointing import complete_checkpoints, read_info
from anemia_dist.run_dir import PREEMPTED, read_metrics

pytestmark = [pytest.mark.slurm, pytest.mark.multiprocess]

CLUSTER = SLURM / "local_cluster.sh"
HOOKS = Path(__file__).parents[1] / "scripts" / "node_hooks"
NAME = "anemia-dist-multinode"
EPOCHS = 2
STEPS_PER_EPOCH = 10  # 38 training images, 4 ranks, batch 1 (the last round padded)
PAUSE_STEP = STEPS_PER_EPOCH + 3  # rank 0 pauses 3 s in epoch 2 step 3: a signal then stops the ranks after step 4


@dataclass
class Cluster:
    state: Path
    env: dict[str, str]
    """Environment of SLURM clients (and of launches) for this cluster."""
    network: dict[str, str]
    """``STATE/network.env``: SUBNET, BRIDGE, HEAD_ADDR, NODE1_ADDR, NODE2_ADDR."""

    @property
    def id(self) -> str:
        return self.network["BRIDGE"].removeprefix("adbr")

    def namespace(self, node: int) -> str:
        return f"anemia-dist-{self.id}-node{node}"

    def address(self, node: int) -> str:
        return self.network[f"NODE{node}_ADDR"]

    def on_node(self, node: int, command: list[str]) -> list[str]:
        return ["nsenter", f"--net=/var/run/netns/{self.namespace(node)}", *command]

    def pid_files(self) -> list[Path]:
        return [*self.state.glob("slurm*.pid"), self.state / "munge" / "munged.pid"]


def start_cluster(nodes: int = 2) -> Cluster:
    """``local_cluster.sh up --nodes N`` in a fresh directory (not under pytest's private tmp: munged
    needs every folder above its socket searchable)."""
    state = Path(tempfile.mkdtemp(prefix="anemia-dist-slurm-")) / "state"
    state.parent.chmod(0o755)
    ports = {"SLURMCTLD_PORT": str(free_port()), "SLURMD_PORT": str(free_port())}
    up = subprocess.run(
        [str(CLUSTER), "up", "--nodes", str(nodes), str(state)],
        env={**os.environ, **ports},
        capture_output=True,
        text=True,
        timeout=120,
    )
    env_file = state / "network.env"
    network = dict(re.findall(r"^(\w+)=(\S+)$", env_file.read_text(), re.M)) if env_file.is_file() else {}
    cluster = Cluster(state, {}, network)
    if up.returncode != 0:
        stop_cluster(cluster)
        pytest.fail(f"local cluster did not start:\n{up.stderr}")
    conf = re.search(r"^export SLURM_CONF=(\S+)$", up.stdout, re.M).group(1)
    venv_bin = str(Path(sys.executable).parent)
    cluster.env = {**os.environ, "SLURM_CONF": conf, "PATH": f"{venv_bin}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    return cluster


def stop_cluster(cluster: Cluster) -> None:
    down = subprocess.run([str(CLUSTER), "down", str(cluster.state)], capture_output=True, text=True, timeout=180)
    assert down.returncode == 0, down.stderr
    shutil.rmtree(cluster.state.parent, ignore_errors=True)


def command_output(command: list[str]) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def command_line(pid: int) -> str:
    """The process's command line, or "" once it has ended."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def namespace_pids(cluster: Cluster) -> set[int]:
    """Every process inside the nodes' namespaces: the slurmds and the jobs."""
    pids = set()
    for node in (1, 2):
        listed = subprocess.run(["ip", "netns", "pids", cluster.namespace(node)], capture_output=True, text=True)
        pids |= {int(pid) for pid in listed.stdout.split()}
    return pids


def processes_of(cluster: Cluster) -> list[int]:
    """Its daemons (by their PID files) and every process inside its nodes' namespaces."""
    return sorted({int(path.read_text()) for path in cluster.pid_files() if path.is_file()} | namespace_pids(cluster))


def leftovers(cluster: Cluster, processes: list[int]) -> list[str]:
    """Whatever of this cluster still exists: namespaces, links, routes, the processes, files."""
    found = [f"namespace {line}" for line in command_output(["ip", "netns", "list"]).splitlines() if cluster.id in line]
    found += [
        f"link {line}" for line in command_output(["ip", "-o", "link", "show"]).splitlines() if cluster.id in line
    ]
    routes = command_output(["ip", "-4", "route", "show", "table", "all"]).splitlines()
    found += [f"route {line}" for line in routes if cluster.network["SUBNET"].removesuffix(".0/24") + "." in line]
    found += [f"process {pid}" for pid in processes if Path(f"/proc/{pid}").exists()]
    if cluster.state.exists():
        found.append(f"directory {cluster.state}")
    return found


@pytest.fixture(scope="session")
def cluster():
    """The two-node cluster for the session, always taken down at the end (and checked to be gone)."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root")
    needed = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "ip", "nsenter")
    missing = [binary for binary in needed if shutil.which(binary) is None]
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: apt-get install -y slurm-wlm munge iproute2")
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        processes = processes_of(cluster)
        stop_cluster(cluster)
    assert leftovers(cluster, processes) == []


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("multinode") / "data", {"anemic": 24, "non-anemic": 24})


def train_args(data: Path, output_dir: Path) -> list[str]:
    return [
        *TINY,
        "train.batch_size=1",
        f"data.root={data}",
        f"train.epochs={EPOCHS}",
        "early_stopping.patience=100",
        f"run.output_dir={output_dir}",
    ]


def interface_of(cluster: Cluster, node: int) -> str:
    """The interface holding the node's address inside its namespace."""
    out = command_output(cluster.on_node(node, ["ip", "-o", "-4", "addr", "show"]))
    return next(line.split()[1] for line in out.splitlines() if f" {cluster.address(node)}/" in line)


def start_on_node(cluster: Cluster, node: int, command: list[str], env: dict) -> subprocess.Popen:
    """``command`` in the node's namespace, outside SLURM, as one would start it by hand on a machine."""
    full_env = {**cluster.env, "ACCELERATE_USE_CPU": "true", **env}
    return subprocess.Popen(
        cluster.on_node(node, command),
        env=full_env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(processes: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, float]]:
    """Each process's status, output and seconds until it ended, counted from now (just after all started)."""
    started = time.monotonic()

    def wait(process: subprocess.Popen) -> tuple[int, str, float]:
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        return process.returncode, output, time.monotonic() - started

    with ThreadPoolExecutor(len(processes)) as pool:
        return list(pool.map(wait, processes))


def machine_options(rank: int, main_ip: str, port: int) -> list[str]:
    """One machine's part of a 2 x 2-process CPU launch."""
    return [
        *("--multi_gpu", "--num_machines", "2", "--num_processes", "4", "--machine_rank", str(rank)),
        *("--mixed_precision", "no", "--dynamo_backend", "no"),
        *("--main_process_ip", main_ip, "--main_process_port", str(port)),
    ]


@pytest.fixture(scope="module")
def uninterrupted(cluster, data, tmp_path_factory) -> Path:
    """A 4-rank run on both nodes with plain ``accelerate launch`` (no SLURM): the reference run.

    As on two real machines, each node names its own interface for gloo (a host name would
    resolve to loopback); rank 0's node hosts the rendezvous on its address.
    """
    out = tmp_path_factory.mktemp("uninterrupted")
    program = ["-m", "anemia_dist", "train", *train_args(data, out), "run.name=reference"]
    port = free_port()
    processes = [
        start_on_node(
            cluster,
            node,
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                *machine_options(node - 1, cluster.address(1), port),
                *program,
            ],
            {"GLOO_SOCKET_IFNAME": interface_of(cluster, node)},
        )
        for node in (1, 2)
    ]
    for node, (returncode, output, _) in enumerate(finish(processes, timeout=300), start=1):
        assert returncode == 0, f"node{node}:\n{output[-6000:]}"
    return out / "reference"


def test_two_node_cluster_uses_its_own_names_and_addresses_and_down_leaves_nothing(cluster):
    """A second cluster beside the session's gets other names and another /24; `down` removes all of
    it (namespaces, veths, bridge, route, daemons, a running job's processes, files) and leaves the
    first one running."""
    other = start_cluster()
    processes: list[int] = []
    try:
        assert other.id != cluster.id and other.network["SUBNET"] != cluster.network["SUBNET"]
        assert re.fullmatch(r"10\.\d+\.\d+\.0/24", other.network["SUBNET"])
        for node in (1, 2):  # each slurmd runs inside its node's namespace, which holds the node's address
            slurmd = (other.state / f"slurmd-node{node}.pid").read_text().strip()
            assert slurmd in command_output(["ip", "netns", "pids", other.namespace(node)]).split()
            assert interface_of(other, node) == f"veth-node{node}"
        sbatch = ["sbatch", "--parsable", "--nodes=2", "--output=/dev/null", "--wrap=srun sleep 600"]
        job = subprocess.run(sbatch, env=other.env, capture_output=True, text=True, check=True).stdout.strip()
        wait_for(other.env, job, lambda info: info["JobState"] == "RUNNING", timeout=60)
        deadline = time.monotonic() + 30
        while sum(command_line(pid).startswith("/usr/bin/sleep") for pid in processes) < 2:
            assert time.monotonic() < deadline, "the job's tasks did not start on both nodes"
            time.sleep(0.2)
            processes = processes_of(other)
        assert len(leftovers(other, processes)) > 5, "the check sees a live cluster"
    finally:
        processes = processes or processes_of(other)
        stop_cluster(other)
    assert leftovers(other, processes) == []
    states = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=cluster.env, capture_output=True, text=True)
    assert states.stdout.split() == ["node1", "idle", "node2", "idle"], states


def test_accelerate_launch_without_slurm_runs_four_ranks_across_the_two_nodes(uninterrupted):
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["epochs_run"] == EPOCHS
    assert [row["world_size"] for row in read_metrics(uninterrupted)] == [4] * EPOCHS


def job_env(cluster: Cluster, port: int, **hooks: str) -> dict[str, str]:
    """Environment for a multi-node job: its rendezvous port, and the test hooks in its ranks."""
    return {
        "MAIN_PROCESS_PORT": str(port),
        "RENDEZVOUS_TIMEOUT": "120",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HOOKS), os.environ.get("PYTHONPATH")])),
        **hooks,
    }


def wait_for_file(path: Path, cluster: Cluster, job: str, workdir: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        state = job_info(cluster.env, job)["JobState"]
        assert state in ("PENDING", "RUNNING") and time.monotonic() < deadline, output_of(workdir, job, NAME)[-5000:]
        time.sleep(0.2)


def test_usr1_mid_epoch_with_skewed_node_exits_requeues_and_ends_like_the_uninterrupted_run(
    cluster, data, uninterrupted, tmp_path
):
    """SIGUSR1 to the batch step in epoch 2 step 3: all 4 ranks stop after step 4 with a checkpoint;
    node2's ranks exit 3 s after node1's, so srun terminates them and returns a signal's status,
    yet the job requeues (the run's preempted.json decides) and finishes with the metrics of an
    uninterrupted 4-rank run."""
    paused = tmp_path / "paused"
    hooks = {"ANEMIA_DIST_TEST_PAUSE": f"{PAUSE_STEP}:3:{paused}", "ANEMIA_DIST_TEST_EXIT_DELAY": "1:3"}
    env = job_env(cluster, free_port(), **hooks)
    job = submit(cluster.env, tmp_path, "train_multi_node.sbatch", train_args(data, tmp_path), ("--nodes=2",), env)
    try:
        wait_for_file(paused, cluster, job, tmp_path)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster.env, check=True)
        wait_for(cluster.env, job, lambda info: int(info["Restarts"]) >= 1, timeout=120)
        info = wait_for(cluster.env, job, lambda info: info["JobState"] in FINISHED, timeout=300)
    finally:
        subprocess.run(["scancel", job], env=cluster.env, capture_output=True)
    output = output_of(tmp_path, job, NAME)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", output[-5000:]
    first, _, second = output.partition(f"job {job} SLURM_RESTART_COUNT=1")
    # The nodes talked over their own addresses and interfaces.
    for node in (1, 2):
        assert f"node{node} machine rank {node - 1}: rendezvous {cluster.address(1)}:" in first
        assert f"GLOO_SOCKET_IFNAME={interface_of(cluster, node)} " in first
    # srun's status was not 75 (the skew), and the job requeued all the same.
    requeued = re.search(r"after the preemption signal \(training status (\d+)\): requeueing job", first)
    assert requeued and requeued.group(1) != "75", first[-5000:]
    # Mid-epoch: after step 4 (the step after the signal), later only if the signal came late.
    assert re.search(r"resumed from \S+/epoch-0001-step-00000[4-9] ", second), second[-5000:]
    resumed, reference = read_metrics(tmp_path / f"slurm-{job}"), read_metrics(uninterrupted)
    assert [row["epoch"] for row in resumed] == [row["epoch"] for row in reference] == list(range(1, EPOCHS + 1))
    for got, want in zip(resumed, reference, strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (got["epoch"], key)
        assert got["lr"] == want["lr"] and got["world_size"] == want["world_size"] == 4


def test_plain_scancel_leaves_a_complete_loadable_checkpoint(cluster, data, tmp_path):
    """SIGTERM to every process of the job mid-epoch: the ranks still agree, save and mark it."""
    paused = tmp_path / "paused"
    env = job_env(cluster, free_port(), ANEMIA_DIST_TEST_PAUSE=f"{PAUSE_STEP}:3:{paused}")
    job = submit(cluster.env, tmp_path, "train_multi_node.sbatch", train_args(data, tmp_path), ("--nodes=2",), env)
    try:
        wait_for_file(paused, cluster, job, tmp_path)
        subprocess.run(["scancel", job], env=cluster.env, check=True)
        wait_for(cluster.env, job, lambda info: info["JobState"] in FINISHED, timeout=120)
        slurmds = {int((cluster.state / f"slurmd-node{node}.pid").read_text()) for node in (1, 2)}
        deadline = time.monotonic() + 90  # the job's processes end within SLURM's KillWait (30 s)
        while namespace_pids(cluster) - slurmds:
            assert time.monotonic() < deadline, command_output(["ps", "-ef"])
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", job], env=cluster.env, capture_output=True)
    run_dir = tmp_path / f"slurm-{job}"
    saved = Path(json.loads((run_dir / PREEMPTED).read_text())["checkpoint"])
    assert complete_checkpoints(run_dir / "checkpoints")[-1] == saved, output_of(tmp_path, job, NAME)[-5000:]
    info = read_info(saved)
    assert info["world_size"] == 4
    assert info["progress"]["epoch"] == 1 and PAUSE_STEP - STEPS_PER_EPOCH < info["progress"]["step"] < STEPS_PER_EPOCH
    assert sorted(p.name for p in saved.glob("random_states_*.pkl")) == [f"random_states_{r}.pkl" for r in range(4)]
    model = load_file(saved / "model.safetensors")
    assert model and all(torch.isfinite(t).all() for t in model.values())
    assert torch.load(saved / "optimizer.bin", weights_only=False)["state"]


def test_requeue_in_a_job_array_requeues_only_its_own_task(cluster, tmp_path):
    """The task whose job id is the array's own id asks to be requeued (status 75); the other
    tasks, already finished, must not run again."""
    script = tmp_path / "array.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        f"source {SLURM / 'lib.sh'}\n"
        "status=0\n"
        'if [[ $SLURM_JOB_ID == "$SLURM_ARRAY_JOB_ID" && ${SLURM_RESTART_COUNT:-0} == 0 ]]; then\n'
        "    sleep 4  # the other tasks are done by now\n"
        "    status=$PREEMPTED_EXIT_CODE\n"
        "fi\n"
        'finish_or_requeue "$status"\n'
    )
    sbatch = ["--array=0-2", "--ntasks=1", "--open-mode=append", f"--output={tmp_path}/task-%a.out"]
    array = submit(cluster.env, tmp_path, script, [], tuple(sbatch))
    tasks = [f"{array}_{task}" for task in range(3)]
    try:
        infos = {task: wait_for(cluster.env, task, lambda info: info["JobState"] in FINISHED, 60) for task in tasks}
        requeued = [task for task, info in infos.items() if info["JobId"] == array]
        assert len(requeued) == 1
        infos[requeued[0]] = wait_for(cluster.env, requeued[0], lambda i: i["Restarts"] == "1", 60)
        infos[requeued[0]] = wait_for(cluster.env, requeued[0], lambda i: i["JobState"] in FINISHED, 90)
        infos |= {task: job_info(cluster.env, task) for task in tasks if task not in requeued}  # requeued too?
    finally:
        subprocess.run(["scancel", array], env=cluster.env, capture_output=True)
    outputs = {task: (tmp_path / f"task-{task.split('_')[1]}.out").read_text() for task in tasks}
    for task, info in infos.items():
        assert info["JobState"] == "COMPLETED", (task, info, outputs[task])
        assert info["Restarts"] == ("1" if task in requeued else "0"), (task, outputs[task])
    assert f"requeueing job {requeued[0]}" in outputs[requeued[0]]


def test_a_launch_that_cannot_reach_the_main_node_fails_on_every_node_naming_the_address(cluster):
    """Without SLURM, through slurm/node_launch.sh on each node, RENDEZVOUS_TIMEOUT=15:
    (a) node2 is given a port nobody listens on: it gives up on reaching node1, and node1, whose
    rendezvous waits for it, gives up too; (b) both are given an address that is not node1's:
    node1 refuses at once, node2 gives up. Every node fails within the bound, naming the address."""
    timeout, bound = 15, 15 + 60  # start-up of the launcher on a loaded 2-core machine included
    launcher = [str(SLURM / "node_launch.sh")]
    program = ["-m", "anemia_dist", "train", "--config", "default"]  # never reached
    port, wrong_port = free_port(), free_port()
    stranger = cluster.network["SUBNET"].replace(".0/24", ".99")
    env = {"RENDEZVOUS_TIMEOUT": str(timeout)}
    commands = {
        ("a", 1): machine_options(0, cluster.address(1), port),
        ("a", 2): machine_options(1, cluster.address(1), wrong_port),
        ("b", 1): machine_options(0, stranger, port),
        ("b", 2): machine_options(1, stranger, port),
    }
    processes = [
        start_on_node(cluster, node, [*launcher, *options, *program], env) for (_, node), options in commands.items()
    ]
    results = dict(zip(commands, finish(processes, timeout=bound + 30), strict=True))
    for (case, node), (returncode, output, seconds) in results.items():
        assert returncode != 0 and seconds < bound, (case, node, seconds, output[-3000:])
        tried = {"a": f"{cluster.address(1)}:{wrong_port if node == 2 else port}", "b": stranger}[case]
        assert re.search(rf"node_launch.sh: .*machine rank {node - 1}.*{re.escape(tried)}", output), (
            case,
            node,
            output[-3000:],
        )
    assert "is not an address of this node" in results["b", 1][1]
    assert results["b", 1][2] < timeout, "a wrong address on the main node is refused at once"
    for case in ("a", "b"):
        assert "could not reach the rendezvous" in results[case, 2][1]
