"""Issue 11, section 4: on real-shaped Alpaca data the evaluation measures the model, not the token limit.

EM rests on enough short-answer rows (or says it can't), the generation limit covers the references, the share of
answers the limit cut is recorded, and the two proxies (unsupported words, label adherence) are measured.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from alpaca_like import alpaca_like_rows, write_alpaca_like

from alpaca_qlora.data.bundled import generate_rows
from alpaca_qlora.data.formatting import nearest_rank, response_token_count, stop_margin, token_limit
from alpaca_qlora.data.sampling import split_rows
from alpaca_qlora.evaluation.answer_text import is_stated_option
from alpaca_qlora.evaluation.metrics import (
    aggregate,
    cut_by_limit,
    is_label_row,
    is_short_answer,
    metric_deltas,
    score_row,
    unsupported_word_share,
)
from alpaca_qlora.models.loading import load_tokenizer
from support.params import embedded_params

ROOT = Path(__file__).resolve().parents[1]
SHORT_TYPES = ("closed_qa", "factual", "classification")


def with_ids(rows):
    return [{"id": f"{index:05d}", **row} for index, row in enumerate(rows)]


def short_rule(row):
    return is_short_answer(row.get("task_type"), row["output"], short_answer_task_types=SHORT_TYPES, max_words=5)


# --- the split: EM rows first ---------------------------------------------------------------------------------------

def test_real_shaped_data_has_few_short_answers_and_the_split_draws_them_first():
    rows = with_ids(alpaca_like_rows(1000))
    available = sum(map(short_rule, rows))
    assert 30 <= available <= 80  # about 5%, as in alpaca-cleaned
    plain = split_rows(rows, sample_frac=0.1, eval_size=200, seed=42)
    assert sum(map(short_rule, plain.eval)) < 20  # the old stratified draw: EM would rest on about 10 rows
    split = split_rows(rows, sample_frac=0.1, eval_size=200, seed=42, min_short_answer=30, is_short=short_rule)
    assert len(split.eval) == 200
    assert sum(map(short_rule, split.eval)) >= 30
    assert split.report["eval_short_answer_rows"] == sum(map(short_rule, split.eval))
    assert split.report["short_answer_rows_available"] == available


def test_fewer_short_rows_than_wanted_takes_all_and_reports_it():
    rows = with_ids(alpaca_like_rows(1000))
    available = sum(map(short_rule, rows))
    split = split_rows(rows, sample_frac=0.1, eval_size=200, seed=42, min_short_answer=150, is_short=short_rule)
    assert split.report["eval_short_answer_rows"] == available < split.report["eval_short_answer_rows_wanted"] == 150
    assert len(split.eval) == 200


def test_short_rows_are_drawn_stratified_by_task_type_and_the_split_stays_seeded_and_frac_free():
    rows = with_ids([{"instruction": f"q{i}", "input": "", "task_type": task_type,
                      "output": "yes" if i % 4 else "a long answer of many more words than five"}
                     for i, task_type in enumerate(["factual"] * 300 + ["classification"] * 100 + ["open"] * 600)])
    kwargs = dict(eval_size=100, seed=5, min_short_answer=60, is_short=short_rule)
    split = split_rows(rows, sample_frac=0.1, **kwargs)
    short = Counter(row["task_type"] for row in split.eval if short_rule(row))
    assert sum(short.values()) >= 60
    assert short["factual"] >= 3 * short["classification"] - 3  # 225 : 75 short rows available
    assert split.eval == split_rows(rows, sample_frac=0.3, **kwargs).eval
    assert split.eval == split_rows(list(reversed(rows)), sample_frac=0.1, **kwargs).eval
    assert split.eval != split_rows(rows, sample_frac=0.1, **{**kwargs, "seed": 6}).eval


def test_data_with_enough_short_answers_keeps_its_natural_mix():
    # The bundled set is about 80% short-answer: a minimum of 150 of 200 must not crowd out its open-ended rows.
    rows = with_ids(generate_rows())
    plain = split_rows(rows, sample_frac=0.1, eval_size=200, seed=42)
    split = split_rows(rows, sample_frac=0.1, eval_size=200, seed=42, min_short_answer=150, is_short=short_rule)
    natural, drawn = plain.report["eval_rows_by_task_type"], split.report["eval_rows_by_task_type"]
    assert drawn["open_ended"] == natural["open_ended"]
    assert all(abs(drawn[name] - natural[name]) <= 1 for name in natural)  # rounding in two strata levels
    assert split.report["eval_short_answer_rows"] == sum(map(short_rule, plain.eval)) >= 150


def sample_project(tmp_path: Path, rows, **eval_params) -> Path:
    tmp_path.mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["eval"].update(eval_params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return tmp_path


def run_sample(project: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), ALPACA_QLORA_LOG_LEVEL="INFO")
    return subprocess.run([sys.executable, str(ROOT / "stages" / "sample.py")], cwd=project, env=env,
                          capture_output=True, text=True, check=True)


def test_sample_stage_warns_when_the_source_has_too_few_short_answers(tmp_path):
    rows = with_ids(alpaca_like_rows(1000))
    few = run_sample(sample_project(tmp_path / "few", rows, min_short_answer=150))
    report = json.loads((tmp_path / "few" / "metrics" / "sample.json").read_text())
    assert "WARNING" in few.stderr and "exact match will rest on only" in few.stderr
    assert report["eval_short_answer_rows"] == sum(map(short_rule, rows)) < 150
    enough = run_sample(sample_project(tmp_path / "enough", rows, min_short_answer=30))
    assert "WARNING" not in enough.stderr
    assert json.loads((tmp_path / "enough" / "metrics" / "sample.json").read_text())["eval_short_answer_rows"] >= 30


# --- the token limit ------------------------------------------------------------------------------------------------

def test_auto_limit_covers_99_percent_of_references_and_respects_the_cap():
    counts = list(range(1, 1001))
    limit = token_limit("auto", counts, margin=3, cap=4096)
    assert limit["max_new_tokens"] == 990 + 3
    assert sum(count + 3 <= limit["max_new_tokens"] for count in counts) >= 0.99 * len(counts)
    assert limit["references_over_limit"] <= 0.01
    capped = token_limit("auto", counts, margin=3, cap=500)
    assert capped["max_new_tokens"] == 500 and capped["references_over_limit"] == pytest.approx(0.503)
    fixed = token_limit(64, counts, margin=3, cap=500)
    assert fixed["max_new_tokens"] == 64 and fixed["references_over_limit"] == pytest.approx(0.939)
    assert nearest_rank([5], 0.99) == 5


def test_auto_limit_on_real_shaped_references_with_a_real_tokenizer(tiny_mistral_dir):
    tokenizer = load_tokenizer(str(tiny_mistral_dir))
    rows = alpaca_like_rows(400)
    counts = [response_token_count(tokenizer, row["output"]) for row in rows]
    margin = stop_margin(tokenizer, ("### ",))
    assert 1 <= margin <= 6
    limit = token_limit("auto", counts, margin=margin, cap=4096)
    covered = sum(count + margin <= limit["max_new_tokens"] for count in counts)
    assert covered >= 0.99 * len(counts)
    assert limit["max_new_tokens"] > 3 * 64  # the old fixed limit of 64 would cut most of these references
    assert token_limit(64, counts, margin=margin, cap=4096)["references_over_limit"] > 0.5


def test_max_new_tokens_param_accepts_auto_or_an_integer():
    assert embedded_params(eval={"max_new_tokens": "auto"}).eval.max_new_tokens == "auto"
    assert embedded_params(eval={"max_new_tokens": 96}).eval.max_new_tokens == 96
    assert embedded_params(eval={"max_new_tokens": "128"}).eval.max_new_tokens == 128  # as -S writes it
    for bad in ("lots", 0, True):
        with pytest.raises(ValueError, match="eval.max_new_tokens"):
            embedded_params(eval={"max_new_tokens": bad})
    with pytest.raises(ValueError, match="eval.max_new_tokens_cap"):
        embedded_params(eval={"max_new_tokens_cap": 0})
    with pytest.raises(ValueError, match="eval.min_short_answer"):
        embedded_params(eval={"min_short_answer": -1})


def test_cut_by_limit_only_when_neither_eos_nor_a_marker_ended_the_answer():
    markers = ("### ",)
    assert cut_by_limit("and so on and so", stopped_by_eos=False, new_tokens=8, max_new_tokens=8, stop_markers=markers)
    assert not cut_by_limit("done", stopped_by_eos=True, new_tokens=8, max_new_tokens=8, stop_markers=markers)
    assert not cut_by_limit("done\n\n### Instruction", stopped_by_eos=False, new_tokens=8, max_new_tokens=8,
                            stop_markers=markers)
    assert not cut_by_limit("done\n\n###", stopped_by_eos=False, new_tokens=8, max_new_tokens=8, stop_markers=markers)
    assert not cut_by_limit("short", stopped_by_eos=False, new_tokens=3, max_new_tokens=8, stop_markers=markers)


def test_cut_rate_is_aggregated_per_model_and_differenced():
    def row(cut):
        return {"task_type": None, "short_answer": False, "stopped_by_eos": not cut, "cut_by_limit": cut,
                **score_row("an answer", "a reference", short_answer=False, context="q")}
    base = aggregate([row(True), row(True), row(False), row(True)])
    tuned = aggregate([row(False), row(False), row(False), row(True)])
    assert base["overall"]["cut_by_limit_rate"] == 0.75 and tuned["overall"]["cut_by_limit_rate"] == 0.25
    assert metric_deltas(base, tuned)["overall"]["cut_by_limit_rate_delta"] == -0.5


# --- the proxies ----------------------------------------------------------------------------------------------------

def test_unsupported_word_share():
    context = "What is the capital of France?\n"
    assert unsupported_word_share("Paris", context, "Paris") == 0.0
    assert unsupported_word_share("The capital of France is Paris.", context, "Paris") == 0.0  # stop words ignored
    assert unsupported_word_share("Paris, a city founded by Napoleon", context, "Paris") == pytest.approx(3 / 4)
    assert unsupported_word_share("It is that.", context, "Paris") is None  # no content words


@pytest.mark.parametrize(("answer", "text", "expected"), [
    ("gas", "Is argon a solid, a liquid or a gas at room temperature?", True),
    ("Solid.", "At room temperature, is holmium solid, liquid or gas? Answer with one word.", True),
    ("liquid", "Is it solid, liquid or gas?", True),
    ("solid or liquid", "Is it solid, liquid or gas?", False),
    ("It is a gas.", "Is argon a solid, a liquid or a gas?", False),
    ("Halogen", "Classify the element into one of these families: alkali metal, halogen, noble gas.\nIodine", True),
    ("noble gas", "Which family does iodine belong to: alkali metal, halogen, noble gas?", True),
    ("yes", "Is 1234 divisible by 3? Answer yes or no.", True),
    ("Negative", "Classify the sentiment of this review as positive or negative.\nAwful food.", True),
    ("Paris", "What is the capital of France?", False),
    ("", "Is it yes or no?", False),
])
def test_is_stated_option(answer, text, expected):
    assert is_stated_option(answer, text) is expected


def test_bundled_classification_rows_state_their_labels_and_only_they_count_as_label_rows():
    rows = generate_rows()
    label_rows = Counter(row["task_type"] for row in rows
                         if is_label_row(row["task_type"], f"{row['instruction']}\n{row['input']}", row["output"]))
    classification = sum(row["task_type"] == "classification" for row in rows)
    assert set(label_rows) == {"classification"}
    assert label_rows["classification"] >= 0.95 * classification  # "Of A and B, which ..." offers no "or" list


def test_label_rows_without_task_types_are_those_whose_reference_is_an_offered_option():
    rows = alpaca_like_rows(1000)
    label_rows = [row for row in rows if is_label_row(None, f"{row['instruction']}\n{row['input']}", row["output"])]
    assert label_rows and all(len(row["output"].split()) == 1 for row in label_rows)
    scored = score_row("Positive, because the food was good", "Negative", short_answer=True,
                       context="Classify the sentiment of this review as positive or negative.\nAwful.")
    assert scored["label_adherence"] is False
    assert score_row("positive", "Negative", short_answer=True,
                     context="Classify the sentiment as positive or negative.")["label_adherence"] is True
    assert score_row("Paris", "Paris", short_answer=True, context="Capital of France?")["label_adherence"] is None


def test_proxies_aggregate_per_task_type_and_difference():
    context = "Is sodium a metal, a nonmetal or a metalloid?"

    def row(answer, task_type="classification"):
        return {"task_type": task_type, "short_answer": True, "stopped_by_eos": True,
                **score_row(answer, "metal", short_answer=True, context=context, task_type=task_type)}
    base = aggregate([row("Sodium is a shiny metal"), row("metal"), row("a soft metal", "factual")])
    tuned = aggregate([row("metal"), row("metal"), row("metal", "factual")])
    assert base["by_task_type"]["classification"]["label_adherence"] == 0.5
    assert base["by_task_type"]["classification"]["n_label_rows"] == 2
    assert base["by_task_type"]["factual"]["n_label_rows"] == 0  # a factual row is no label row
    assert base["overall"]["unsupported_word_share"] == pytest.approx((1 / 3 + 0 + 1 / 2) / 3, abs=1e-6)  # shiny; soft
    deltas = metric_deltas(base, tuned)["overall"]
    assert deltas["label_adherence_delta"] == 0.5
    assert deltas["unsupported_word_share_delta"] == pytest.approx(-5 / 18, abs=1e-6)
    assert "n_label_rows_delta" not in deltas


# --- the path a user takes: a local real-format file through fetch, sample, format and evaluate ----------------------

@pytest.mark.slow
def test_local_real_format_file_through_sample_format_and_evaluate(tmp_path, tiny_mistral_dir):
    """The random tiny model never emits EOS, so every answer runs into the limit: the cut rate must say so."""
    project = tmp_path / "project"
    write_alpaca_like(project / "data" / "external" / "alpaca_like.json", 400)
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source="local", path="data/external/alpaca_like.json", eval_size=16)
    params["model"].update(name=str(tiny_mistral_dir), quantization="none")
    params["eval"].update(max_new_tokens="auto", max_new_tokens_cap=12, min_short_answer=6, batch_size=8)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", ALPACA_QLORA_LOG_LEVEL="INFO")
    logs = ""
    for stage in ("fetch", "sample", "format", "evaluate"):
        arguments = ["base"] if stage == "evaluate" else []
        result = subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py"), *arguments], cwd=project,
                                env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        logs += result.stderr
    eval_rows = [json.loads(line) for line in (project / "data" / "formatted" / "eval.jsonl").read_text().splitlines()]
    assert all(row["reference_tokens"] > 0 for row in eval_rows)
    metrics = json.loads((project / "metrics" / "eval_base.json").read_text())
    run, overall = metrics["run"], metrics["overall"]
    assert run["max_new_tokens_requested"] == "auto" and run["max_new_tokens"] == 12  # capped
    assert run["covering_99pct"] > 12 and run["references_over_limit"] > 0.5
    assert "cuts" in logs and "of the references short" in logs  # a capped limit is never silent
    assert overall["n_short_answer"] >= 6
    assert overall["cut_by_limit_rate"] == 1.0
    predictions = [json.loads(line)
                   for line in (project / "data" / "predictions" / "base.jsonl").read_text().splitlines()]
    assert all(row["cut_by_limit"] and row["new_tokens"] == 12 for row in predictions)
    assert all("unsupported_word_share" in row and "label_adherence" in row for row in predictions)
