"""Benchmarks' quick tier: they run and write well-formed results (timings are not asserted)."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_step_time_quick_tier(tmp_path):
    import step_time

    assert step_time.main(["--tier", "quick", "--out", str(tmp_path)]) == 0
    result = json.load(open(tmp_path / "step_time_quick.json"))
    assert set(result["models"]) == {"resnet20", "resnet18"} and result["compiled"] is None
    for model in result["models"].values():
        assert set(model["median_step_s"]) == set(step_time.METHODS)
        assert model["ratio_to_fp"]["fp"] == 1.0 and all(v > 0 for v in model["median_step_s"].values())
        assert model["cpu_ratio_to_fp"]["fp"] == 1.0 and all(v > 0 for v in model["median_cpu_s"].values())
    assert result["models"]["resnet18"]["input"] == [3, 64, 64]
    assert (tmp_path / "step_time_quick.md").read_text().startswith("**resnet20_cifar** 1x28x28, batch 128")
    sens = result["sensitivity"]
    assert set(sens["seconds"]) == {"ggn", "hutchinson", "exact"} and sens["time_ratio_hutchinson_to_ggn"] > 0
    assert all(-1 <= rho <= 1 for rho in sens["spearman"].values())
    assert all(set(bits) == set(sens["values"]["exact"]) for bits in sens["allocations"].values())
    assert "| ggn |" in (tmp_path / "step_time_quick.md").read_text()
    assert {"adq_w4_per_channel", "lsq_w4_per_channel"} <= set(result["init"])


def test_qat_accuracy_tiers_have_the_issue_18_budget():
    import qat_accuracy

    standard, epoch1 = qat_accuracy.TIERS["standard"], qat_accuracy.TIERS["epoch1"]
    assert standard.epochs >= 4 and len(standard.seeds) == 3 and "teacher.epochs=6" in standard.overrides
    assert set(standard.rows) == set(qat_accuracy.ROWS)
    weight_only = {n for n, r in qat_accuracy.ROWS.items() if r.config in qat_accuracy.WEIGHT_ONLY_CONFIGS}
    assert weight_only == {"w2", "w3", "lsq_w2", "lsq_w3", "dkm_w2", "dkm_w3"}
    # the earlier standard budget, whose table the README keeps
    assert epoch1.epochs == 1 and epoch1.seeds == (0,) and "teacher.epochs=2" in epoch1.overrides
    assert not weight_only & set(epoch1.rows)


# B1's quick tier trains 7 rows; CI runs two of them (an ADQ row and the DKM peer, one with a second seed).
B1_CI_ROWS = ("w2a2", "dkm_w2")


@pytest.mark.parametrize("rows", [pytest.param(B1_CI_ROWS, id="ci-rows"),
                                  pytest.param(None, id="all-rows", marks=pytest.mark.heavy)])
def test_qat_accuracy_quick_tier(tmp_path, monkeypatch, rows):
    import qat_accuracy

    args = ["--tier", "quick", "--work-dir", str(tmp_path / "runs"), "--out", str(tmp_path),
            "--cache-dir", str(tmp_path / "cache")]
    assert qat_accuracy.main(args + (["--rows", *rows] if rows else [])) == 0
    result = json.load(open(tmp_path / "qat_accuracy_quick.json"))
    assert set(result["rows"]) == set(rows or qat_accuracy.TIERS["quick"].rows)
    methods = {"ADQ", "coremltools DKM"} if rows else {"ADQ", "LSQ", "ASQ+POST", "coremltools DKM"}
    assert {r["method"] for r in result["rows"].values()} >= methods
    assert (tmp_path / "qat_accuracy_quick.png").stat().st_size > 0
    assert 0 < result["teacher_top1"] <= 1
    for row in result["rows"].values():
        (run,) = row["seeds"].values()
        assert 0 <= row["top1"] <= 1 and 0 <= row["fp_top1"] <= 1 and len(run["epoch_time_s"]) == 1
        assert row["top1"] == row["top1_min"] == row["top1_max"] == run["top1"]
    if rows is None:
        assert result["rows"]["mixed2.8"]["average_weight_bits"] <= 2.8
        assert result["rows"]["w2"]["activation_bits"] is None
    assert result["rows"]["dkm_w2"]["activation_bits"] is None
    assert "| w2a2 |" in (tmp_path / "qat_accuracy_quick.md").read_text()
    # A second seed of one row: the row becomes the mean of both, with the min-max.
    assert qat_accuracy.main(args + ["--rows", "w2a2", "--seeds", "0", "1"]) == 0
    two = json.load(open(tmp_path / "qat_accuracy_quick.json"))["rows"]["w2a2"]
    tops = [s["top1"] for s in two["seeds"].values()]
    assert set(two["seeds"]) == {"0", "1"} and two["top1"] == pytest.approx(sum(tops) / 2)
    assert (two["top1_min"], two["top1_max"]) == (min(tops), max(tops))
    # A later invocation at another commit reuses the finished runs (nothing re-trains) and credits
    # each to the commit that ran it, not to itself.
    ran_by = {name: {k: s["commit"] for k, s in row["seeds"].items()}
              for name, row in json.load(open(tmp_path / "qat_accuracy_quick.json"))["rows"].items()}
    later = dict(qat_accuracy.run_record("qat_accuracy.py", args), commit="a-later-commit")
    monkeypatch.setattr(qat_accuracy, "run_record", lambda *_: later)
    monkeypatch.setattr(qat_accuracy, "subprocess", None)  # a row that re-trained would raise here
    assert qat_accuracy.main(args + ["--rows", "w2a2"]) == 0
    again = json.load(open(tmp_path / "qat_accuracy_quick.json"))
    assert again["commit"] == "a-later-commit"
    assert {name: {k: s["commit"] for k, s in row["seeds"].items()} for name, row in again["rows"].items()} == ran_by


@pytest.mark.parametrize("methods", [pytest.param(["rtn", "gptq", "sa"], id="ci-methods"),
                                     pytest.param(None, id="all-methods", marks=pytest.mark.heavy)])
def test_ptq_quick_tier(tmp_path, methods):
    """CI leaves out OBQ, the slow reference solver (the heavy tier runs it)."""
    import ptq

    args = ["--tier", "quick", "--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache")]
    assert ptq.main(args + (["--methods", *methods] if methods else [])) == 0
    result = json.load(open(tmp_path / "ptq_quick.json"))
    ran = {(r["model"], r["method"]) for r in result["rows"]}
    assert {("resnet20", m) for m in (methods or ptq.METHODS)} <= ran and ("minilm", "sa") in ran
    for row in result["rows"]:
        if row["method"] != "fp":
            assert row["wall_s"] > 0 and row["recon_error"] >= 0
    assert all(0 <= r["top1"] <= 1 for r in result["rows"] if "top1" in r)
    assert f"| resnet20 | 3 | {'sa' if methods else 'obq'} |" in (tmp_path / "ptq_quick.md").read_text()


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
        if "reference" in row:  # never worse than the previous implementation (the refinement also starts
            # from a uniform grid and keeps the lower-error fit, so it may be better)
            assert row["error"] <= row["reference"] * (1 + 1e-4)
