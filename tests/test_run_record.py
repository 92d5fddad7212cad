"""The run record (chapters save values for the closing page) and the claims table built from it."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from sparse_tutorial.studies import claims, record


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_TUTORIAL_CACHE", str(tmp_path))
    return tmp_path


def test_save_and_load_round_trip(cache):
    path = record.save("01_dense_ff", {"ratio": np.float64(1.5), "n": torch.tensor(3), "ok": True,
                                       "missing": float("nan"), "speed": {"moe FF": np.float32(0.5)}})
    assert path == cache / "book_record" / "01_dense_ff.json"
    doc = record.load("01_dense_ff")
    assert doc["values"] == {"ratio": 1.5, "n": 3, "ok": True, "missing": None, "speed": {"moe FF": 0.5}}
    assert doc["run size"] and doc["machine"] and doc["time"]
    assert list(record.load_all()) == ["01_dense_ff"]


def test_a_record_of_another_run_size_is_left_out(cache):
    record.save("04_sparse_qkv", {"x": 1})
    doc = json.loads((cache / "book_record" / "04_sparse_qkv.json").read_text())
    doc["run size"] = "some other size"
    (cache / "book_record" / "04_sparse_qkv.json").write_text(json.dumps(doc))
    assert record.load("04_sparse_qkv") is None and record.load_all() == {}


def test_bad_names_and_values_are_refused(cache):
    with pytest.raises(ValueError, match="chapter"):
        record.save("../elsewhere", {})
    with pytest.raises(TypeError, match="object"):
        record.save("01_dense_ff", {"x": object()})


def docs(**chapters):
    return {ch: {"chapter": ch, "values": values} for ch, values in chapters.items()}


def test_claims_follow_the_recorded_numbers():
    good = docs(**{"01_dense_ff": {"batch1 measured / predicted": 1.3, "FF share min": 0.65, "FF share max": 0.69},
                   "06_moe_and_pkm": {"batch-1 decode speed-up": {"sparse FF": 1.25, "moe FF": 0.9},
                                      "ranking by val loss": ["dense", "sparse FF"]}})
    table = claims.claims_table(good).set_index("claim")
    assert table.loc["Single-token decoding is bound by the bytes of weights it reads", "held"] == "yes"
    assert "1.30x" in table.loc["Single-token decoding is bound by the bytes of weights it reads",
                                "measured in this build"]
    assert table.loc["Every sparse FF variant is slower than dense", "held"] == "no"
    assert table.loc["The dense FF reaches the best language-model loss", "held"] == "yes"
    ch3 = claims.claims_table(docs(**{"03_training_sparse_ff": {"LM sparse val / dense val": 1.159}})).set_index("claim")
    row = ch3.loc["Sparse FF matches dense quality (this build's chapter 3 run)"]
    assert row["held"] == "no" and "+15.9%" in row["measured in this build"]
    slow = docs(**{"01_dense_ff": {"batch1 measured / predicted": 7.0, "FF share min": 0.65, "FF share max": 0.69}})
    table = claims.claims_table(slow).set_index("claim")
    assert table.loc["Single-token decoding is bound by the bytes of weights it reads", "held"] == "no"


def test_a_claim_without_a_number_says_so():
    table = claims.claims_table({})
    assert set(table["held"]) == {"not measured"}
    assert set(table["measured in this build"]) == {claims.NOT_MEASURED}
    assert len(table) == len(claims.CLAIMS)


def test_counts_print_as_whole_numbers():
    v = {"qkv params d1024": 169152.0, "dense qkv params d1024": 4198400.0, "formula matches": True}
    row = claims.claims_table(docs(**{"04_sparse_qkv": v})).set_index("chapter").loc["04_sparse_qkv"]
    assert "169,152 against 4,198,400 (25x fewer)" in row[row["held"] == "yes"]["measured in this build"].iloc[0]


def test_the_quality_study_gives_the_gap_at_its_longest_run():
    study = pd.DataFrame({"grid": ["levers", "steps", "steps"], "lever": ["sparse", "sparse", "dense"],
                          "steps": [400, 1000, 1000], "gap %": [4.0, 7.2, 0.0]})
    assert claims.study_gap(study, "sparse") == (1000, 7.2)
    row = claims.claims_table({}, study).set_index("claim").loc[
        "Sparse FF matches dense quality (the quality study, default size)"]
    assert row["held"] == "no" and "+7.2%" in row["measured in this build"]


def test_the_committed_study_is_read():
    table = claims.read_study(claims.gap.STUDY_CSV)
    assert table is not None and "sparse" in set(table.lever)
