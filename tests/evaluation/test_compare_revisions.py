"""`python -m alpaca_qlora.evaluation.compare_revisions A B` on a tiny git + DVC repository: commits, an experiment."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from alpaca_qlora.evaluation.significance import compare_paired
from support import ROOT
from support.commands import dvc, run

RESAMPLES = 10_000
SEED = 7
pytestmark = pytest.mark.slow

# A stand-in for the evaluate stage: scored predictions of 60 fixed rows, the share answered right set by a param.
PREDICT = textwrap.dedent('''
    import json, random, yaml
    from alpaca_qlora.evaluation.metrics import score_row
    quality = yaml.safe_load(open("quality.yaml"))["quality"]
    layout, answers = random.Random(0), random.Random(1)
    with open("data/predictions/finetuned.jsonl", "w") as handle:
        for index in range(60):
            reference = layout.choice(["Paris", "blue", "Na", "the sun rose slowly over the quiet hills"])
            answer = reference if answers.random() < quality else "something else entirely"
            short = len(reference.split()) <= 5
            row = {"id": f"row-{index:02d}", "task_type": "factual", "answer": answer, "reference": reference,
                   "short_answer": short, "stopped_by_eos": answers.random() < quality,
                   **score_row(answer, reference, short_answer=short)}
            handle.write(json.dumps(row) + "\\n")
''')




def compare(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "alpaca_qlora.evaluation.compare_revisions", *args], cwd=cwd, check=check)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """Commit `weak` (quality 0.3), commit `strong` (0.8) after it, and experiment `tuned` (0.6) on `strong`."""
    path = tmp_path_factory.mktemp("revisions")
    (path / "predict.py").write_text(PREDICT)
    (path / "data" / "predictions").mkdir(parents=True)
    (path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"evaluate": {
        "cmd": "python predict.py", "deps": ["predict.py"], "params": [{"quality.yaml": ["quality"]}],
        "outs": ["data/predictions/finetuned.jsonl"]}}}))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())  # the command's bootstrap defaults come from here
    params["eval"]["bootstrap_seed"] = SEED
    (path / "params.yaml").write_text(yaml.safe_dump(params))
    for command in (["git", "init", "-q"], ["git", "config", "user.email", "test@example.com"],
                    ["git", "config", "user.name", "test"]):
        run(command, cwd=path)
    dvc("init", "-q", cwd=path)
    dvc("config", "core.analytics", "false", cwd=path)
    for tag, quality in (("weak", 0.3), ("strong", 0.8)):
        (path / "quality.yaml").write_text(yaml.safe_dump({"quality": quality}))
        dvc("repro", cwd=path)
        (path / f"{tag}.jsonl").write_bytes((path / "data/predictions/finetuned.jsonl").read_bytes())
        run(["git", "add", "-A"], cwd=path)
        run(["git", "commit", "-qm", tag], cwd=path)
        run(["git", "tag", tag], cwd=path)
    dvc("exp", "run", "-S", "quality.yaml:quality=0.6", "--name", "tuned", cwd=path)
    (path / "tuned.jsonl").write_bytes((path / "data/predictions/finetuned.jsonl").read_bytes())
    run(["git", "checkout", "-q", "--", "."], cwd=path)  # the workspace back at `strong`
    dvc("checkout", "-q", cwd=path)
    return path


def test_two_commits_compare_like_the_significance_module_on_their_files(repo, tmp_path):
    out = tmp_path / "weak_vs_strong.json"
    result = compare("weak", "strong", "--json", str(out), cwd=repo)
    keys = json.loads(out.read_text())
    expected = compare_paired(read_rows(repo / "weak.jsonl"), read_rows(repo / "strong.jsonl"),
                              resamples=RESAMPLES, seed=SEED)
    assert keys["a_commit"] == run(["git", "rev-parse", "weak"], cwd=repo).stdout.strip()
    assert keys["n_paired_rows"] == 60
    assert (keys["bootstrap_resamples"], keys["bootstrap_seed"]) == (RESAMPLES, SEED)  # from params.yaml
    for name, paired in expected.items():
        assert (keys[f"{name}_delta"], keys[f"{name}_delta_ci_low"], keys[f"{name}_delta_ci_high"]) == \
            (paired.delta, paired.ci_low, paired.ci_high), name
    assert keys["exact_match_delta"] > 0 and keys["exact_match_delta_ci_low"] > 0
    assert keys["exact_match_mcnemar_p"] < 0.05
    table = result.stdout
    assert "| exact_match |" in table and "exact McNemar p" in table and "A = weak (" in table


def test_an_experiment_name_resolves_to_its_commit_and_its_cached_predictions(repo, tmp_path):
    out = tmp_path / "strong_vs_tuned.json"
    compare("strong", "tuned", "--json", str(out), cwd=repo)
    keys = json.loads(out.read_text())
    refs = run(["git", "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps"], cwd=repo).stdout
    named = [line.split()[1] for line in refs.splitlines() if line.split()[0].endswith("/tuned")]
    assert named == [keys["b_commit"]]
    strong, tuned = read_rows(repo / "strong.jsonl"), read_rows(repo / "tuned.jsonl")
    assert strong != tuned
    assert keys["exact_match_delta"] == compare_paired(strong, tuned, resamples=RESAMPLES, seed=SEED)[
        "exact_match"].delta
    workspace = compare("strong", "workspace", "--json", str(out), cwd=repo)  # the workspace is `strong`
    keys = json.loads(out.read_text())
    assert keys["b_commit"] is None and keys["exact_match_delta"] == 0 and keys["exact_match_mcnemar_p"] == 1.0
    assert "(n.s.)" in workspace.stdout


def test_an_unknown_revision_fails_clearly(repo):
    result = compare("weak", "no-such-thing", cwd=repo, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "'no-such-thing' is neither a git revision nor an experiment" in result.stderr
