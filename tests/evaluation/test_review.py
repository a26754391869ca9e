"""`make review` and .ci/review.sh on a tiny git + DVC repository whose stage writes fake predictions (no model)."""
from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from alpaca_qlora.evaluation.report import delta_with_interval, prompt_excerpt
from alpaca_qlora.evaluation.significance import compare_paired, exact_match_mcnemar, pair_rows
from support import ROOT
from support.commands import dvc, run
from support.params import write_embedded_params

pytestmark = pytest.mark.slow

# A stand-in for train + evaluate: 60 fixed rows, each answered right with probability lora.r / 40 (its own draw
# per r, so a change both gains and loses rows); a loss metric and a timing file as the real stages write them.
PREDICT = textwrap.dedent('''
    import json, os, random, yaml
    from alpaca_qlora.evaluation.metrics import score_row
    r = yaml.safe_load(open("params.yaml"))["lora"]["r"]
    layout, answers = random.Random(0), random.Random(r)
    os.makedirs("metrics/timing", exist_ok=True)
    rows = []
    for index in range(60):
        reference = layout.choice(["Paris", "blue", "Na", "the sun rose slowly over the quiet hills"])
        answer = reference if answers.random() < r / 40 else f"not {reference} but something else"
        short = len(reference.split()) <= 5
        prompt = f"Below is an instruction.\\n\\n### Instruction:\\nQuestion {index}?\\n\\n### Response:\\n"
        rows.append({"id": f"row-{index:02d}", "task_type": "factual", "answer": answer, "reference": reference,
                     "prompt": prompt,
                     "short_answer": short, "stopped_by_eos": True, **score_row(answer, reference, short_answer=short)})
    with open("data/predictions/finetuned.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\\n" for row in rows)
    json.dump({"loss": round(1 / r, 4)}, open("metrics/train.json", "w"))
    json.dump({"runtime_s": 100 + r}, open("metrics/timing/evaluate_finetuned.json", "w"))
''')




def make_review(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The project's Makefile target, with its venv setup skipped (-o setup): this interpreter is the venv."""
    return run(["make", "-s", "-f", str(ROOT / "Makefile"), "-o", "setup", "review", *args], cwd=cwd, check=check)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def origin(tmp_path_factory) -> dict[str, Path]:
    """Branch main (lora.r 16) and branch pr (r 32), both pushed to a remote that the committed config does not
    name; experiments `smaller` (r 8) and `reseeded` (data.seed 7) on main."""
    base = tmp_path_factory.mktemp("review")
    repo, remote = base / "origin", base / "remote"
    (repo / "data" / "predictions").mkdir(parents=True)
    (repo / "predict.py").write_text(PREDICT)
    write_embedded_params(repo / "params.yaml")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"evaluate": {
        "cmd": "python predict.py", "deps": ["predict.py"], "params": ["lora.r", "data.seed"],
        "outs": ["data/predictions/finetuned.jsonl", {"metrics/timing/evaluate_finetuned.json": {"cache": False}}],
        "metrics": [{"metrics/train.json": {"cache": False}}]}}}))
    for command in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "test@example.com"],
                    ["git", "config", "user.name", "test"]):
        run(command, cwd=repo)
    dvc("init", "-q", cwd=repo)
    dvc("config", "core.analytics", "false", cwd=repo)
    dvc("remote", "add", "-d", "shared", "../../nowhere", cwd=repo)  # as a clone on another machine would see it
    dvc("remote", "modify", "--local", "shared", "url", str(remote), cwd=repo)
    for branch, r in (("main", 16), ("pr", 32)):
        if branch != "main":
            run(["git", "checkout", "-q", "-b", branch], cwd=repo)
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["lora"]["r"] = r
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        dvc("repro", "-q", cwd=repo)
        (base / f"{branch}.jsonl").write_bytes((repo / "data/predictions/finetuned.jsonl").read_bytes())
        run(["git", "add", "-A"], cwd=repo)
        run(["git", "commit", "-qm", branch], cwd=repo)
        dvc("push", "-q", cwd=repo)
    run(["git", "checkout", "-q", "main"], cwd=repo)
    dvc("checkout", "-q", cwd=repo)
    dvc("exp", "run", "-S", "lora.r=8", "--name", "smaller", cwd=repo)
    (base / "smaller.jsonl").write_bytes((repo / "data/predictions/finetuned.jsonl").read_bytes())
    dvc("exp", "run", "-S", "data.seed=7", "--name", "reseeded", cwd=repo)
    run(["git", "checkout", "-q", "--", "."], cwd=repo)
    dvc("checkout", "-q", cwd=repo)
    return {"repo": repo, "remote": remote, "copies": base}


def section(text: str, title: str) -> str:
    return text.split(f"### {title}", 1)[1].split("\n### ", 1)[0]


def test_make_review_has_changed_params_paired_intervals_flipped_rows_and_timing_apart(origin):
    repo = origin["repo"]
    make_review(repo, "BASE=main", "REV=smaller")
    text = (repo / "reports/review.md").read_text()
    before, after = read_rows(origin["copies"] / "main.jsonl"), read_rows(origin["copies"] / "smaller.jsonl")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["eval"]
    expected = compare_paired(before, after, resamples=params["bootstrap_resamples"], seed=params["bootstrap_seed"])
    mcnemar = exact_match_mcnemar(pair_rows(before, after))

    assert "| lora.r | 16 | 8 |" in section(text, "Params changed")
    results = section(text, "Results")
    em = expected["exact_match"]
    delta, interval = delta_with_interval(em.delta, em.ci_low, em.ci_high)
    assert f"| {delta} | {interval} |" in results
    assert "(n.s.)" in delta or em.ci_low > 0 or em.ci_high < 0
    assert f"{mcnemar['exact_match_only_before']} rows right only in A" in results and "McNemar p" in results
    assert "| metrics/train.json | loss | 0.0625 | 0.1250 |" in section(text, "Other metrics")

    flipped = section(text, "Flipped rows")
    by_id = {row["id"]: (old, row) for old, row in pair_rows(before, after)}
    gained, lost = flipped.split("**Lost")
    for block, sign in ((gained, 1), (lost, -1)):
        ids = [line.split("`")[1] for line in block.splitlines() if line.startswith("| `row-")]
        assert 1 <= len(ids) <= 3
        for row_id in ids:
            old, new = by_id[row_id]
            assert new["short_answer"] and new["exact_match"] - old["exact_match"] == sign
            line = next(line for line in block.splitlines() if f"`{row_id}`" in line)
            assert old["answer"] in line and new["answer"] in line and old["reference"] in line
            assert prompt_excerpt(new["prompt"]).split("\n")[-1] in line
    assert "runtime_s" in section(text, "Timing") and "runtime_s" not in text.split("### Timing")[0]
    assert "| evaluate_finetuned | runtime_s | 116 | 108 |" in section(text, "Timing")


def test_runs_on_another_eval_split_are_refused_and_the_file_says_why(origin):
    repo = origin["repo"]
    result = make_review(repo, "BASE=main", "REV=reseeded", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "the eval split differs" in result.stderr and "data.seed 42 -> 7" in result.stderr
    assert "Not comparable" in (repo / "reports/review.md").read_text()


def review_clone(origin: dict[str, Path], tmp_path: Path, name: str) -> Path:
    """A fresh clone of branch pr, as CI checks it out, with an old review.md that no failed run may post."""
    clone = tmp_path / name
    run(["git", "clone", "-q", str(origin["repo"]), str(clone)], cwd=tmp_path)
    run(["git", "checkout", "-q", "pr"], cwd=clone)
    (clone / "reports").mkdir()
    (clone / "reports/review.md").write_text("## alpaca-qlora review\n\nan older run's review\n")
    return clone


def ci_review(clone: Path, comment: Path, **env: str) -> subprocess.CompletedProcess:
    return run(["bash", str(ROOT / ".ci/review.sh")], cwd=clone, check=False, COMMENT_FILE=str(comment),
               REPO_TOKEN="", **env)


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stderr)
    return lines[0]


def test_ci_script_dry_run_pulls_from_the_secret_remote_and_writes_the_comment(origin, tmp_path):
    clone = review_clone(origin, tmp_path, "clone")
    assert not (clone / "data/predictions/finetuned.jsonl").exists()
    comment = tmp_path / "comment.md"
    result = ci_review(clone, comment, BASE="origin/main", DVC_REMOTE_URL=str(origin["remote"]))
    assert result.returncode == 0 and "dry run" in result.stderr, result.stderr
    assert read_rows(clone / "data/predictions/finetuned.jsonl") == read_rows(origin["copies"] / "pr.jsonl")
    text = comment.read_text()
    assert text == (clone / "reports/review.md").read_text()
    assert "| lora.r | 16 | 32 |" in text and "A = origin/main (" in text and "B = workspace" in text


@pytest.mark.parametrize("setup", ["unknown base", "no git remote"])
def test_ci_script_without_the_base_commit_says_to_set_base(origin, tmp_path, setup):
    clone = review_clone(origin, tmp_path, "clone")
    comment = tmp_path / "comment.md"
    if setup == "no git remote":
        run(["git", "remote", "remove", "origin"], cwd=clone)
    base = "origin/nope" if setup == "unknown base" else "origin/main"
    line = one_line(ci_review(clone, comment, BASE=base, DVC_REMOTE_URL=str(origin["remote"])))
    assert f"BASE={base} is not a commit" in line and "set BASE" in line
    assert ("remotes: none" in line) == (setup == "no git remote")
    assert not comment.exists()


def test_ci_script_with_an_unreachable_dvc_remote_says_to_set_the_remote(origin, tmp_path):
    clone = review_clone(origin, tmp_path, "clone")
    comment = tmp_path / "comment.md"
    nowhere = tmp_path / ("nowhere-" + "deep/" * 20)  # longer than a terminal line: `dvc remote list` wraps those
    line = one_line(ci_review(clone, comment, BASE="origin/main", DVC_REMOTE_URL=str(nowhere)))
    assert "cannot pull data/predictions/finetuned.jsonl" in line and "set DVC_REMOTE_URL" in line
    assert f"({nowhere})" in line and "reports/dvc-pull.log" in line
    assert "failed to pull" in (clone / "reports/dvc-pull.log").read_text()
    assert not comment.exists()


def test_ci_script_without_any_dvc_remote_uses_the_secret_or_says_to_set_it(origin, tmp_path):
    clone = review_clone(origin, tmp_path, "clone")
    dvc("remote", "remove", "shared", cwd=clone)
    comment = tmp_path / "comment.md"
    line = one_line(ci_review(clone, comment, BASE="origin/main"))
    assert "no DVC remote" in line and "set DVC_REMOTE_URL" in line and not comment.exists()
    result = ci_review(clone, comment, BASE="origin/main", DVC_REMOTE_URL=str(origin["remote"]))
    assert result.returncode == 0, result.stderr
    assert "| lora.r | 16 | 32 |" in comment.read_text()
