import json
from pathlib import Path

import huggingface_hub
import pytest

from alpaca_qlora.data.records import clean_rows, read_rows
from alpaca_qlora.data.sources import SourceUnavailableError, hub_file, local_file

SHA = "0123456789abcdef0123456789abcdef01234567"


def test_hub_source_reads_the_downloaded_file_and_records_the_commit(tmp_path, monkeypatch):
    snapshot = tmp_path / "datasets--yahma--alpaca-cleaned" / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    (snapshot / "alpaca_data_cleaned.json").write_text(json.dumps(
        [{"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, sleep, move."}]))
    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        return str(snapshot / kwargs["filename"])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    found = hub_file("yahma/alpaca-cleaned", "alpaca_data_cleaned.json", SHA)
    assert calls == [{"repo_id": "yahma/alpaca-cleaned", "filename": "alpaca_data_cleaned.json",
                      "repo_type": "dataset", "revision": SHA}]
    assert found.description["resolved_commit"] == SHA
    rows, report = clean_rows(read_rows(found.path))
    assert report.kept == 1 and rows[0]["output"] == "Eat well, sleep, move."


def test_hub_source_offline_names_the_alternatives(monkeypatch, tmp_path):
    # The offline flag is read when huggingface_hub is imported; without it the same error comes after retries.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached to fall back on
    with pytest.raises(SourceUnavailableError, match="data.source=bundled"):
        hub_file("yahma/alpaca-cleaned", "alpaca_data_cleaned.json", "main")


def test_local_source_requires_an_existing_file_under_data_external(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "external").mkdir(parents=True)
    with pytest.raises(SourceUnavailableError, match="is not a file"):
        local_file("data/external/missing.json")
    existing = tmp_path / "data" / "external" / "rows.jsonl"
    existing.write_text("{}\n")
    assert local_file("data/external/rows.jsonl").path == Path("data/external/rows.jsonl")
    assert local_file("./data/external/../external/rows.jsonl").path.resolve() == existing


def test_a_source_dvc_cannot_see_is_refused_with_how_to_import_it(tmp_path, monkeypatch):
    """Such a source was read once and its later changes ignored (DVC reran nothing): the rows went stale."""
    project = tmp_path / "project"
    (project / "data" / "external").mkdir(parents=True)
    monkeypatch.chdir(project)
    outside = tmp_path / "alpaca.json"
    outside.write_text(json.dumps([{"instruction": "i", "input": "", "output": "o"}]))
    for path in (str(outside), "../alpaca.json", "data/external/../../alpaca.json"):
        with pytest.raises(SourceUnavailableError, match="outside data/external/") as refused:
            local_file(path)
        assert f"dvc import-url {path} data/external/alpaca.json" in str(refused.value)
    for url in ("http://127.0.0.1:9/alpaca.json", "https://example.org/data/alpaca.json?download=1"):
        with pytest.raises(SourceUnavailableError, match="is a URL") as refused:
            local_file(url)  # refused before any connection is tried
        assert f"dvc import-url {url} data/external/alpaca.json" in str(refused.value)
        assert "dvc update data/external/alpaca.json.dvc" in str(refused.value)
