"""A file system too small for the checkpoints: stopped before training when it shows, and one
clear message on every rank when a write still fails (tested on a real small tmpfs)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import TINY, launch, make_image_folder, run_cli, script

from anemia_dist.run_dir import BEST, CHECKPOINTS, METRICS, WEIGHTS

pytestmark = pytest.mark.multiprocess


def small_disk(path: Path, megabytes: int) -> Path:
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)], check=False)
    if mounted.returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    return path


@pytest.fixture
def disks(tmp_path):
    mounted: list[Path] = []
    yield lambda megabytes: mounted.append(small_disk(tmp_path / f"disk{len(mounted)}", megabytes)) or mounted[-1]
    for path in mounted:
        subprocess.run(["umount", str(path)], check=True)


def overrides(data: Path, disk: Path) -> list[str]:
    return [*TINY, f"data.root={data}", f"run.output_dir={disk}", "run.name=r", "train.epochs=2"]


def test_a_disk_too_small_for_the_checkpoints_stops_before_training(tmp_path, disks, image_folder):
    disk = disks(20)
    result = run_cli("train", *overrides(image_folder, disk))
    assert result.returncode == 2, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("anemia-dist train: error:") and "not enough free space" in message
    assert str(disk) in message and "MiB needed" in message and "Traceback" not in result.stderr
    assert not (disk / "r" / METRICS).exists() and not (disk / "r" / CHECKPOINTS).exists()


def test_a_write_that_fails_ends_every_rank_with_one_message_and_no_partial_checkpoint(tmp_path, disks):
    # 70 MB: best/ (resnet18, 45 MB) fits, the first checkpoint's weights do not.
    disk = disks(70)
    data = make_image_folder(tmp_path / "data", {"anemic": 6, "non-anemic": 8})
    result = launch([script("roomy_disk.py"), *overrides(data, disk)], timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("anemia-dist train: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert f"could not write under {disk / 'r'}" in errors[0] and "No space left on device" in errors[0]
    assert "the last complete checkpoint is none yet" in errors[0] and "MiB;" in errors[0]
    # Every rank raises the same error (no rank waits forever: the launch ends well inside its
    # timeout); the launcher reports the first exit, 2 as for any user error, and stops the rest.
    assert "exitcode  : 2" in result.stderr
    assert "anemia_dist/" not in result.stderr, "no traceback from the package"
    assert (disk / "r" / BEST / WEIGHTS).is_file(), "the best model written before survives"
    assert list((disk / "r" / CHECKPOINTS).iterdir()) == [], "the partial checkpoint is removed"
