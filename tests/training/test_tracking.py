"""W&B logging never stops training: without a reachable server it logs offline and says how to upload later."""
from __future__ import annotations

import logging
import os
import socket
import time

import pytest

from alpaca_qlora.training.tracking import publish_curves, wandb_environment
from support import ROOT

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def listening_port():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


@pytest.fixture
def closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once the socket is closed


@pytest.fixture
def keyed(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.delenv("WANDB_MODE", raising=False)


def test_an_unreachable_server_means_offline_with_how_to_sync(keyed, closed_port, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port}")
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="alpaca_qlora.training.tracking"):
        env = wandb_environment("alpaca-qlora")
    assert time.perf_counter() - started < 10
    assert env["WANDB_MODE"] == "offline"
    assert "unreachable" in caplog.text and "wandb sync" in caplog.text
    assert FAKE_KEY not in caplog.text


def test_a_reachable_server_with_a_key_stays_online(keyed, listening_port, monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{listening_port}")
    assert "WANDB_MODE" not in wandb_environment("alpaca-qlora")


def test_an_offline_run_with_a_key_set_finishes_without_the_server(keyed, closed_port, monkeypatch, tmp_path):
    """What the train stage's W&B callback does, with the environment the fallback chose."""
    import wandb

    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "20")  # before the fallback, init failed after this with a CommError
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key, value in wandb_environment("alpaca-qlora").items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    run = wandb.init(dir=str(tmp_path))
    run.log({"loss": 1.0})
    run.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert os.environ["WANDB_MODE"] == "offline"




def test_without_dvclive_the_plots_out_holds_a_note_saying_why_it_has_no_curves(tmp_path):
    out = tmp_path / "metrics" / "train_log" / "plots"
    publish_curves(tmp_path / "live", out, enabled=False)
    assert [path.name for path in out.iterdir()] == ["README.md"]
    assert "train.dvclive" in (out / "README.md").read_text()


def test_with_dvclive_the_plots_out_holds_the_curves_and_nothing_from_an_older_run(tmp_path):
    live_curve = tmp_path / "live" / "plots" / "metrics" / "train" / "loss.tsv"
    live_curve.parent.mkdir(parents=True)
    live_curve.write_text("step\tloss\n1\t2.5\n")
    out = tmp_path / "plots"
    (out / "metrics" / "train").mkdir(parents=True)
    (out / "README.md").write_text("an older run's note")
    publish_curves(tmp_path / "live", out, enabled=True)
    assert sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file()) == [
        "metrics/train/loss.tsv"]
    assert (out / "metrics" / "train" / "loss.tsv").read_text() == "step\tloss\n1\t2.5\n"


def test_the_train_stage_publishes_its_curves_into_the_declared_out():
    script = (ROOT / "stages" / "train.py").read_text()
    assert "publish_curves(" in script and 'PLOTS_OUT = Path("metrics/train_log/plots")' in script
