import json

import huggingface_hub
import pytest

from alpaca_qlora.records import clean_rows, read_rows
from alpaca_qlora.sources import SourceUnavailableError, hub_file, local_file

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


def test_local_source_requires_an_existing_file(tmp_path):
    with pytest.raises(SourceUnavailableError, match="is not a file"):
        local_file(str(tmp_path / "missing.json"), tmp_path)
    existing = tmp_path / "rows.jsonl"
    existing.write_text("{}\n")
    assert local_file(str(existing), tmp_path).path == existing


def test_unreachable_url_is_a_clear_error(tmp_path):
    with pytest.raises(SourceUnavailableError, match="could not download"):
        local_file("http://127.0.0.1:9/alpaca.json", tmp_path)
