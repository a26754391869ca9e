"""Where a run's measurements go besides metrics/train.json: W&B (never blocking a run) and DVCLive's curves."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from alpaca_qlora import io
from alpaca_qlora.training.distributed import process_group

log = logging.getLogger(__name__)

WANDB_DEFAULT_URL = "https://api.wandb.ai"  # wandb's default base_url
WANDB_PROBE_TIMEOUT_S = 5.0
NO_CURVES = """# No curves in this run

`train.dvclive` was false, so the train stage wrote no loss or learning-rate curves. Set `train.dvclive: true` and
run `dvc repro train` to get them (`dvc plots show`).
"""


def wandb_unreachable(base_url: str, timeout_s: float = WANDB_PROBE_TIMEOUT_S) -> str | None:
    """Why the W&B server can't be reached, or None if a connection opens.

    Without network W&B itself retries until its init timeout and then stops the training run with a CommError;
    a connection attempt answers at once or within the probe timeout.
    """
    import socket
    import urllib.parse

    parsed = urllib.parse.urlsplit(base_url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout_s):
            return None
    except OSError as error:
        return f"{type(error).__name__}: {error}"


def wandb_environment(project: str) -> dict[str, str]:
    """W&B settings that never block: offline unless the user configured a key (env or `wandb login`) and the
    server answers."""
    env = {"WANDB_PROJECT": project}
    netrc = Path.home() / ".netrc"
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or (
        netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    )
    if "WANDB_MODE" in os.environ:
        return env
    if not logged_in:
        env["WANDB_MODE"] = "offline"
        return env
    base_url = os.environ.get("WANDB_BASE_URL", WANDB_DEFAULT_URL)
    problem = wandb_unreachable(base_url)
    if problem is not None:
        log.warning("W&B server %s is unreachable (%s): logging offline to ./wandb instead. Upload the run later "
                    "with `wandb sync --sync-all` (or `wandb sync wandb/offline-run-<id>`).", base_url, problem)
        env["WANDB_MODE"] = "offline"
    return env


class LossLogger(TrainerCallback):
    """With DVCLive, writes loss and learning-rate curves for `dvc plots`, by optimizer step.

    A resumed run first replays the log its checkpoint carries: the curves go to a fresh folder each run
    (publish_curves moves them into the out), and the old ones may run past the checkpoint anyway (DVCLive's own
    `resume=True` would continue them, steps after the checkpoint twice). Not
    `transformers.integrations.DVCLiveCallback`: it numbers points by log count rather than optimizer step and
    replays nothing on resume.
    """

    def __init__(self, directory: Path | None):
        self.live = None
        if directory is not None and process_group().is_main:
            from dvclive import Live

            self.live = Live(dir=str(directory), save_dvc_exp=False, dvcyaml=None, report=None)

    def on_train_begin(self, args, state, control, **kwargs):
        for entry in state.log_history:
            if "loss" in entry:
                self.write(int(entry["step"]), entry)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            self.write(state.global_step, logs)

    def write(self, step: int, logs: dict[str, Any]) -> None:
        if self.live is None:
            return
        self.live.step = step
        self.live.log_metric("train/loss", float(logs["loss"]))
        if "learning_rate" in logs:
            self.live.log_metric("train/learning_rate", float(logs["learning_rate"]))
        if "grad_norm" in logs:
            self.live.log_metric("train/grad_norm", float(logs["grad_norm"]))
        self.live.next_step()

    def close(self) -> None:
        if self.live is not None:
            self.live.end()



def publish_curves(live_dir: Path, out: Path, *, enabled: bool) -> None:
    """Replace the declared plots out with DVCLive's curves from `live_dir`, or, with train.dvclive false, a note.

    DVC fails a stage whose declared out is missing, and only once the stage has run: after a whole training run.
    So the folder is always written, and never keeps an older run's curves.
    """
    with io.atomic_dir(out) as tmp:
        curves = live_dir / "plots"
        if enabled and curves.is_dir():
            shutil.copytree(curves, tmp, dirs_exist_ok=True)
        else:
            (tmp / "README.md").write_text(NO_CURVES, encoding="utf-8")
