"""B5's quick tier (benchmarks/transformers_fidelity.py): it runs, writes well-formed results and
resumes from them (fidelity values are not asserted beyond their range)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

pytestmark = pytest.mark.slow  # real MiniLM weights and sentences


# The quick tier's rows CI runs (the others, each a minute or more on 2 cores, in the heavy tier):
# one of every kind but the slow solvers (SA, mixed-precision planning, QAT).
CI_ROWS = ["fp", "w4", "w3", "ptq_gptq_w3", "rtn_w3", "hqq_g64_w3", "nf4_dq", "g128_w3_hessian"]


def run_quick_tier(out, rows=None) -> str:
    """A subprocess, as a user runs it: one torch thread, the Hub unreachable."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "transformers_fidelity.py"), "--tier", "quick",
           "--threads", "1", "--out", str(out)] + (["--rows", *rows] if rows else [])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("wanted", [pytest.param(CI_ROWS, id="ci-rows"),
                                    pytest.param(None, id="all-rows", marks=pytest.mark.heavy)])
def test_transformers_fidelity_quick_tier(tmp_path, wanted):
    import transformers_fidelity
    from common import size_class

    run_quick_tier(tmp_path, wanted)
    result = json.load(open(tmp_path / "transformers_fidelity_quick.json"))
    rows = result["rows"]
    assert list(rows) == (wanted or transformers_fidelity.TIERS["quick"]["rows"])
    fp_bytes = rows["fp"]["checkpoint_bytes"]
    assert rows["fp"]["cosine"] == pytest.approx(1.0, abs=1e-5) and fp_bytes > 0
    for name, row in rows.items():
        assert -1 - 1e-5 <= row["cosine_min"] <= row["cosine"] <= 1 + 1e-5, name
        if row["kind"] == "peer":  # a peer's checkpoint is sized, not reloaded (no loader)
            assert row["reloaded_cosine"] is None, name
        else:  # the packed checkpoint loads back to the same model
            assert row["reloaded_cosine"] == pytest.approx(row["cosine"], abs=1e-4), name
        if name != "fp":
            assert 0 < row["checkpoint_bytes"] < fp_bytes, name
            assert row["bits_per_weight"] > row["avg_weight_bits"] - 0.5, name  # what is stored, >= the codes
            assert row["quantized_weights"] == rows["w4"]["quantized_weights"], name  # the same layers for all
    assert rows["w4"]["avg_weight_bits"] == 4 and rows["w3"]["avg_weight_bits"] == 3
    assert rows["w3"]["checkpoint_bytes"] < rows["w4"]["checkpoint_bytes"]
    # stored bits per weight: codes + per-channel fp32 codebooks (ADQ), fp16 scales + 3-bit zeros per channel
    # (RTN), HQQ's 3-bit packing (10 codes per int32) + fp16 scale and zero per 64, NF4 + 8-bit absmax per 64
    assert 3.25 < rows["w3"]["bits_per_weight"] < 3.75 and 3 < rows["rtn_w3"]["bits_per_weight"] < 3.1
    assert rows["hqq_g64_w3"]["bits_per_weight"] == pytest.approx(3.2 + 0.5, abs=0.01)
    assert 4.125 < rows["nf4_dq"]["bits_per_weight"] < 4.2 and rows["nf4_dq"]["avg_weight_bits"] == 4
    # group scales: their bytes are in the bits per weight, and the byte budget holds with them
    assert 3 < rows["g128_w3_hessian"]["table_bits_per_weight"] < 3.2
    if wanted is None:
        assert rows["mixed3.5"]["avg_weight_bits"] <= 3.5
        assert -1 <= rows["qat_w3"]["cosine_before"] <= 1 and rows["qat_w3"]["steps"] > 0
        assert rows["mixed2.5_ptq_gptq_g64"]["table_bits_per_weight"] <= 2.5
        assert rows["mixed2.5_ptq_gptq_g64"]["recon_error"] <= rows["mixed2.5_ptq_gptq_g64"]["rtn_recon_error"]
    assert result["commit"] and result["command"].startswith("python benchmarks/transformers_fidelity.py")
    text = (tmp_path / "transformers_fidelity_quick.md").read_text()
    assert "| ptq_gptq_w3 |" in text and f"| {size_class(rows['rtn_w3']['bits_per_weight'])} | rtn_w3 |" in text

    # a rerun of the same tier reuses every stored row
    stdout = run_quick_tier(tmp_path, wanted)
    assert stdout.count("stored, skipped") == len(rows)
    rerun = json.load(open(tmp_path / "transformers_fidelity_quick.json"))
    assert rerun["rows"] == rows and rerun["resumed_rows"] == list(rows)
