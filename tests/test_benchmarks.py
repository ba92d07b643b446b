"""Benchmarks' quick tier: they run and write well-formed results (timings are not asserted)."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_step_time_quick_tier(tmp_path):
    import step_time

    assert step_time.main(["--tier", "quick", "--out", str(tmp_path)]) == 0
    result = json.load(open(tmp_path / "step_time_quick.json"))
    assert set(result["median_step_s"]) == set(step_time.METHODS)
    assert result["ratio_to_fp"]["fp"] == 1.0 and all(v > 0 for v in result["median_step_s"].values())
    assert (tmp_path / "step_time_quick.md").read_text().startswith("| method")
    sens = result["sensitivity"]
    assert set(sens["seconds"]) == {"ggn", "hutchinson", "exact"} and sens["time_ratio_hutchinson_to_ggn"] > 0
    assert all(-1 <= rho <= 1 for rho in sens["spearman"].values())
    assert all(set(bits) == set(sens["values"]["exact"]) for bits in sens["allocations"].values())
    assert "| ggn |" in (tmp_path / "step_time_quick.md").read_text()
    assert {"adq_w4_per_channel", "lsq_w4_per_channel"} <= set(result["init"])


def test_qat_accuracy_quick_tier(tmp_path, monkeypatch):
    import qat_accuracy

    args = ["--tier", "quick", "--work-dir", str(tmp_path / "runs"), "--out", str(tmp_path),
            "--cache-dir", str(tmp_path / "cache")]
    assert qat_accuracy.main(args) == 0
    result = json.load(open(tmp_path / "qat_accuracy_quick.json"))
    assert set(result["rows"]) == set(qat_accuracy.TIERS["quick"][1])
    assert {r["method"] for r in result["rows"].values()} >= {"ADQ", "LSQ", "ASQ+POST"}
    assert (tmp_path / "qat_accuracy_quick.png").stat().st_size > 0
    for row in result["rows"].values():
        assert 0 <= row["top1"] <= 1 and 0 <= row["fp_top1"] <= 1 and len(row["epoch_time_s"]) == 1
    assert result["rows"]["mixed2.8"]["average_weight_bits"] <= 2.8
    assert "| w2a2 |" in (tmp_path / "qat_accuracy_quick.md").read_text()
    # A later invocation at another commit reuses the finished rows (nothing re-trains) and credits
    # each to the commit that ran it, not to itself.
    ran_by = {name: row["commit"] for name, row in result["rows"].items()}
    later = dict(qat_accuracy.run_record("qat_accuracy.py", args), commit="a-later-commit")
    monkeypatch.setattr(qat_accuracy, "run_record", lambda *_: later)
    monkeypatch.setattr(qat_accuracy, "subprocess", None)  # a row that re-trained would raise here
    assert qat_accuracy.main(args + ["--rows", "w2a2"]) == 0
    again = json.load(open(tmp_path / "qat_accuracy_quick.json"))
    assert again["commit"] == "a-later-commit"
    assert {name: row["commit"] for name, row in again["rows"].items()} == ran_by


def test_ptq_quick_tier(tmp_path):
    import ptq

    assert ptq.main(["--tier", "quick", "--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache")]) == 0
    result = json.load(open(tmp_path / "ptq_quick.json"))
    methods = {(r["model"], r["method"]) for r in result["rows"]}
    assert {("resnet20", m) for m in ptq.METHODS} <= methods and ("minilm", "sa") in methods
    for row in result["rows"]:
        if row["method"] != "fp":
            assert row["wall_s"] > 0 and row["recon_error"] >= 0
    assert all(0 <= r["top1"] <= 1 for r in result["rows"] if "top1" in r)
    assert "| resnet20 | 3 | obq |" in (tmp_path / "ptq_quick.md").read_text()


def test_scale_quick_tier(tmp_path):
    import scale

    assert scale.main(["--tier", "quick", "--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache")]) == 0
    result = json.load(open(tmp_path / "scale_quick.json"))
    rows = result["rows"]
    assert set(rows) == set(scale.ROWS) and result["shape"]["tie_word_embeddings"]
    assert rows["hqq_w4_g64"]["layers"] == 2 * 7  # every Linear of the 2 decoder layers; the tied head stays float
    assert rows["adq_w4_per_channel"]["layers"] >= 2 * 7
    for name in ("float", "adq_w4_per_channel", "adq_w4_per_tensor", "hqq_w4_g64"):
        assert rows[name]["forward_s"] > 0 and rows[name]["peak_mb"] > 0
    for name in ("ptq_gptq", "ptq_sa"):
        assert rows[name]["ptq_s"] > 0 and rows[name]["ptq_plan"]["blockwise"] and rows[name]["ptq_tokens"] == 4 * 32
    assert "| adq_w4_per_channel |" in (tmp_path / "scale_quick.md").read_text()


def test_readme_results_block_is_generated_from_the_committed_results(tmp_path):
    import readme_results

    assert readme_results.main(["--check"]) == 0, "run python benchmarks/readme_results.py"
    # and the check does fail when a committed number and the README disagree
    readme = tmp_path / "README.md"
    text = open(os.path.join(ROOT, "README.md")).read()
    begin = text.index(readme_results.BEGIN)
    edited = text[:begin] + text[begin:].replace("|", "| 0.00 |", 1)
    readme.write_text(edited)
    assert readme_results.main(["--check", "--readme", str(readme)]) == 1


def test_codebook_init_quick_tier(tmp_path):
    import codebook_init

    assert codebook_init.main(["--tier", "quick", "--out", str(tmp_path)]) == 0
    result = json.load(open(tmp_path / "codebook_init_quick.json"))
    assert set(codebook_init.SPEED_METHODS) <= set(result["speed"])
    assert all(r["params_per_s"] > 0 for r in result["speed"].values())
    assert {r["option"] for r in result["error"]} == set(codebook_init.ERROR_OPTIONS)
    for row in result["error"]:  # the error of the codebook this implementation fits, and the reference's
        assert 0 < row["error"] < 1 and row["table_bits_per_weight"] > 0
        if "converged" in row:
            assert row["converged"] <= row["error"] * (1 + 1e-6)
        if "reference" in row:
            assert abs(row["error"] - row["reference"]) <= 1e-4 * row["reference"]
