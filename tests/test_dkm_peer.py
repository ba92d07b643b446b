"""B1's codebook peer: coremltools' DKM palettization through the recipe's peer backend
(benchmarks/dkm_qat.py). Tiny budgets; the quick tier of benchmarks/qat_accuracy.py runs the row."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("coremltools", reason="coremltools is not installed (pip install -c constraints.txt -e '.[bench]')")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "recipes"))

import dkm_qat  # noqa: E402

RECIPE = os.path.join(ROOT, "recipes", "qat_imagenet.py")


def resnet20():
    import timm

    import adq_hf  # noqa: F401  (registers resnet20_cifar)

    torch.manual_seed(0)
    return timm.create_model("resnet20_cifar", in_chans=1, num_classes=10)


def test_layers_and_bits_follow_adq_hf_and_cap_at_the_weight_count():
    bits = dkm_qat.layer_bits_plan(resnet20(), 2)
    assert len(bits) == 22
    assert bits["conv1"] == 7  # 144 weights: at most 128 clusters
    assert bits["fc"] == 8 and bits["layer1.0.conv1"] == 2 and bits["layer3.2.conv2"] == 2


def test_trained_then_finalized_model_has_the_palette_and_the_outputs_of_eval_mode(one_thread):
    import qat_imagenet

    config = qat_imagenet.load_config(os.path.join(ROOT, "recipes", "configs", "fmnist_resnet20_dkm_w2.yaml"), [])
    backend = dkm_qat.Backend(config, recipe=qat_imagenet)
    model = resnet20()
    step = backend.quantize(model, [], accelerator=None, resume=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    model.train()
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step()
    model.eval()
    with torch.no_grad():
        palettized = model(x)
    final, _ = backend.finish(model, evaluate=None)
    with torch.no_grad():
        assert torch.equal(final(x), palettized)  # the recipe's evaluation in eval mode is the final model's
    assert final.layer1[0].conv1.weight.unique().numel() <= 4 and final.fc.weight.unique().numel() <= 256
    report = backend.report(final)
    assert report["bit_map"]["conv1"]["weight_bits"] == 7 and report["bit_map"]["layer1.0.conv1"]["activation_bits"] is None
    assert 2.0 < report["average_weight_bits"] < 2.1


@pytest.mark.parametrize("extra, message", [
    (["--resume"], "cannot be checkpointed"),
    (["--set", "quantization.activation_bits=4"], "weights only"),
])
def test_refusals_are_one_line(tmp_path, extra, message):
    cmd = [sys.executable, RECIPE, "--config", os.path.join(ROOT, "recipes", "configs", "fmnist_resnet20_dkm_w2.yaml"),
           "--output-dir", str(tmp_path / "o")] + extra
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    # coremltools itself prints notices when imported (missing native library, untested torch version)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
