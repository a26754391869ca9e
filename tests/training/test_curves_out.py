"""The train stage's declared plots out exists whatever train.dvclive says, so DVC never fails after training."""
from __future__ import annotations

from pathlib import Path

from alpaca_qlora.training.tracking import publish_curves

ROOT = Path(__file__).resolve().parents[2]


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
