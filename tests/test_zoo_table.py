"""scripts/zoo_table.py: the supported-architectures table from the zoo tests' records."""

import json
import subprocess
import sys
from pathlib import Path


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "zoo_table.py"


def _record(folder, name, **fields):
    record = {"suite": "timm", "model": name, "family": "ResNet", "layer_types": {"Conv2d": 3, "Linear": 1},
              "float_layers": [], "w8a8_cosine": 0.9991, "w4_reload_equal": True, "deploy_equal": True,
              "generate": None, "trainer_step": None, "notes": "input 64px"}
    record.update(fields)
    (folder / f"{record['suite']}-{name}.json").write_text(json.dumps(record))


def test_table_has_one_row_per_record_and_marks_misses(tmp_path):
    _record(tmp_path, "resnet10t")
    _record(tmp_path, "gpt2", suite="transformers", family="causal-lm", w8a8_cosine=0.98, deploy_equal=False,
            generate=True, trainer_step=True, float_layers=["lm_head"], notes="a | b")
    out = tmp_path / "architectures.md"
    subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), str(out)], check=True, capture_output=True)
    lines = [line for line in out.read_text().splitlines() if line.startswith("| ")]
    assert len(lines) == 3  # header + 2 records, timm before transformers
    assert lines[1].startswith("| timm | `resnet10t` | ResNet | Conv2d x3, Linear x1 | - | 0.9991 | yes | yes | - | - |")
    assert "**0.9800**" in lines[2] and "**no**" in lines[2] and "`lm_head`" in lines[2] and "a \\| b" in lines[2]


def test_empty_or_foreign_folder_is_a_clear_error(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), str(tmp_path / "x.md")], capture_output=True,
                          text=True)
    assert done.returncode != 0 and "ADQ_HF_ZOO_REPORT" in done.stderr
    (tmp_path / "other.json").write_text("{}")
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), str(tmp_path / "x.md")], capture_output=True,
                          text=True)
    assert done.returncode != 0 and "not a zoo record" in done.stderr
