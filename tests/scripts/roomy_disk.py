"""``anemia-dist train`` on a file system that claims to have room: ``shutil.disk_usage`` reports
1 TiB free, so the check before training passes and the real writes meet the real limit.

Usage: ``roomy_disk.py key=value ...`` (under ``accelerate launch``); exits as the CLI does.
"""

from __future__ import annotations

import shutil
import sys

from anemia_dist.cli import main

if __name__ == "__main__":
    shutil.disk_usage = lambda path: shutil._ntuple_diskusage(2**40, 0, 2**40)
    sys.exit(main(["train", *sys.argv[1:]]))
