"""Stands in for ``wandb agent --count N SWEEP_ID`` where there is no W&B server: W&B's own agent
code builds and starts the trial, from the sweep config ``anemia-dist sweep init`` would send.

Array task I gets the sweep's I-th listed value of its one parameter, as run ``task<I>``. The sweep
config is read from the JSON file named by ``$FAKE_SWEEP_CONFIG``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from wandb import wandb_agent


def main(argv: list[str]) -> int:
    if argv[:2] != ["agent", "--count"] or len(argv) != 4:
        print(f"fake wandb: expected `agent --count N SWEEP_ID`, got {argv}", file=sys.stderr)
        return 2
    sweep_id = argv[3].rsplit("/", 1)[-1]  # ENTITY/PROJECT/ID
    os.environ["WANDB_SWEEP_ID"] = sweep_id  # as `wandb agent` does
    config = json.loads(Path(os.environ["FAKE_SWEEP_CONFIG"]).read_text())
    ((key, rule),) = config["parameters"].items()
    task = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id=sweep_id)
    agent._sweep_command = config["command"]
    run = f"task{task}"
    agent._command_run({"run_id": run, "program": config["program"], "args": {key: {"value": rule["values"][task]}}})
    return agent._run_processes[run].wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
