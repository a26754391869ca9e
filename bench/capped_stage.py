"""The train stage with each process's CUDA allocator capped (torch.cuda.set_per_process_memory_fraction): what a
card of that size would hold, on a larger one. Launched by accelerate itself, so the stage (seeing LOCAL_RANK) runs
in place instead of re-executing under a launcher that would drop the cap. The stage's memory budget
(train.memory_budget_gib, alpaca_qlora/training/memory_budget.py) plans within the cap, as on a card of that size, and
its own cap never lifts it:

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no -m bench.capped_stage 24
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path

import torch

from alpaca_qlora.training.memory_budget import cap_process_memory

STAGE = Path(__file__).resolve().parents[1] / "stages" / "train.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cap_gib", type=float, help="GiB each process's CUDA allocator may hold")
    arguments = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.capped_stage caps CUDA memory: it needs a GPU")
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit("run it under `accelerate launch` (the stage would otherwise relaunch itself uncapped)")
    cap_process_memory(arguments.cap_gib, torch.device("cuda", int(os.environ["LOCAL_RANK"])))
    sys.argv = [str(STAGE)]
    runpy.run_path(str(STAGE), run_name="__main__")


if __name__ == "__main__":
    main()
