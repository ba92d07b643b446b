"""B1's peer-library row: a brevitas student (benchmarks/brevitas_peer.py) trained by the recipe
(``quantization.backend: brevitas``, benchmarks/brevitas_qat.py). Tiny budgets."""

import json
import os
import subprocess
import sys

import pytest
import torch

brevitas = pytest.importorskip(
    "brevitas", reason="brevitas is not installed (pip install -c constraints.txt -e '.[bench]')")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import brevitas_peer  # noqa: E402
from brevitas.nn import QuantConv2d, QuantLinear  # noqa: E402

RECIPE = os.path.join(ROOT, "recipes", "qat_imagenet.py")
CONFIGS = {bits: os.path.join(ROOT, "recipes", "configs", f"fmnist_resnet20_brevitas_w{bits}a{bits}.yaml")
           for bits in (2, 3, 4)}


def float_model(seed=0):
    import timm

    import adq_hf  # noqa: F401  (registers resnet20_cifar)

    torch.manual_seed(seed)
    model = timm.create_model("resnet20_cifar", in_chans=1, num_classes=10)
    # non-trivial BatchNorm statistics, so the float network is not near-degenerate
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, 1, 28, 28))
    return model.eval()


def quant_bits(layer):
    return (int(layer.weight_quant.bit_width()), int(layer.input_quantizer.act_quant.bit_width()),
            bool(layer.input_quantizer.act_quant.is_signed))


@pytest.mark.parametrize("bits", [2, 4])
def test_convert_layers_bits_and_outputs(one_thread, bits):
    model = float_model()
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        reference = model(x)
    float_convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    brevitas_peer.convert(model, bits, bits, calibration_batches=[x])
    brevitas_peer.calibrate(model, [x])

    layers = dict(brevitas_peer.quantized_layers(model))
    assert len(layers) == float_convs + 1 == 22  # every conv and the classifier
    assert not any(type(m) in (torch.nn.Conv2d, torch.nn.Linear) for m in model.modules())
    assert isinstance(model.conv1, QuantConv2d) and isinstance(model.fc, QuantLinear)
    # first conv and classifier at 8 bits (weights and inputs); the image input is signed, ReLU outputs not
    assert quant_bits(model.conv1) == (8, 8, True)
    assert quant_bits(model.fc) == (8, 8, False)
    for name, layer in layers.items():
        if name not in ("conv1", "fc"):
            assert quant_bits(layer) == (bits, bits, False), name
        # per-output-channel weight scales
        assert layer.quant_weight().scale.numel() == layer.weight.shape[0], name
    # BatchNorm stays float
    assert isinstance(model.layer1[0].bn1, torch.nn.BatchNorm2d)
    bmap = brevitas_peer.bit_map(model)
    assert bmap["conv1"]["weight_bits"] == 8
    assert bmap["layer2.1.conv1"] == {"weight_bits": bits, "activation_bits": bits, "params": 32 * 32 * 9}
    assert bits < brevitas_peer.average_weight_bits(model) < bits + 0.05  # the 8-bit ends add a little

    with torch.no_grad():
        out = model(x)
    assert not torch.allclose(out, reference, atol=1e-4)  # quantized
    corr = torch.corrcoef(torch.stack([out.flatten(), reference.flatten()]))[0, 1].item()
    assert corr > (0.5 if bits == 2 else 0.9), corr  # but the same network


def test_training_steps_change_loss_and_scales(one_thread):
    from adq_hf.distill import distillation_loss
    from adq_hf.training import TrainSettings, build_optimizer

    teacher = float_model()
    student = float_model()
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    brevitas_peer.convert(student, 2, 2, calibration_batches=[x])
    brevitas_peer.calibrate(student, [x])
    optimizer = build_optimizer(student, TrainSettings(lr=0.05, quantizer_lr=0.01, weight_decay=0.0))
    # the learned activation scales are in the recipe's quantizer group (its own lr, no decay)
    quant_group = [g for g in optimizer.param_groups if g["lr"] == 0.01]
    assert len(quant_group) == 1 and len(quant_group[0]["params"]) == 22
    proxy = student.layer2[0].conv1.input_quantizer.act_quant.fused_activation_quant_proxy
    scale = proxy.tensor_quant.scaling_impl.value
    scale_before, weight_before = scale.detach().clone(), student.layer2[0].conv1.weight.detach().clone()
    with torch.no_grad():
        target = teacher(x)
    student.train()
    losses = []
    for _ in range(6):
        loss = distillation_loss(student(x), y, target, 1.0, 0.5, 2.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    assert not torch.equal(scale.detach(), scale_before)
    assert not torch.equal(student.layer2[0].conv1.weight.detach(), weight_before)


def env():
    e = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def tiny(tmp_path, out, config=CONFIGS[2], **extra):
    settings = {"cache_dir": str(tmp_path / "cache"), "teacher.epochs": 1, "data.train_limit": 256,
                "data.eval_limit": 128, "data.batch_size": 32, "optim.warmup_steps": 2, "optim.max_steps": 6,
                "optim.log_every": 1, "calibration.num_batches": 1}
    settings.update(extra)
    return [sys.executable, RECIPE, "--config", config, "--output-dir", str(out), "--set",
            *[f"{k}={v}" for k, v in settings.items()]]


def test_mixed_precision_layer_bits(one_thread):
    """The mixed row: ``layer_bits`` (an allocation written out) sets each layer's weight bits; the
    activations and the 8-bit ends stay as without it."""
    import yaml

    with open(os.path.join(ROOT, "recipes", "configs", "fmnist_resnet20_brevitas_mixed2.8.yaml")) as fh:
        q = yaml.safe_load(fh)["quantization"]
    model = float_model()
    brevitas_peer.convert(model, q["weight_bits"], q["activation_bits"], layer_bits=q["layer_bits"])
    bmap = brevitas_peer.bit_map(model)
    assert {n: b["weight_bits"] for n, b in bmap.items() if n not in ("conv1", "fc")} == q["layer_bits"]
    assert quant_bits(model.layer3[2].conv2) == (2, 3, False) and quant_bits(model.layer1[1].conv1) == (8, 3, False)
    assert quant_bits(model.fc) == (8, 8, False)
    assert 2.7 < brevitas_peer.average_weight_bits(model) <= 2.8
    assert model.brevitas_config["layer_bits"] == q["layer_bits"]
    with pytest.raises(ValueError, match="layer_bits"):  # a name that matches no layer is an error, as in ADQConfig
        brevitas_peer.convert(float_model(), 3, 3, layer_bits={"layer9.conv": 2})


def test_configs_differ_from_ours_only_in_quantization():
    import yaml

    for bits, path in CONFIGS.items():
        with open(path) as fh:
            ours = yaml.safe_load(fh)
        with open(os.path.join(ROOT, "recipes", "configs", f"fmnist_resnet20_w{bits}a{bits}.yaml")) as fh:
            adq = yaml.safe_load(fh)
        assert ours["quantization"] == {"backend": "brevitas", "weight_bits": bits, "activation_bits": bits}
        assert {k: v for k, v in ours.items() if k not in ("quantization", "output_dir")} == \
               {k: v for k, v in adq.items() if k not in ("quantization", "output_dir")}


@pytest.mark.slow
def test_recipe_row_end_to_end(tmp_path):
    out = tmp_path / "w2a2"
    proc = subprocess.run(tiny(tmp_path, out), env=env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "brevitas" in proc.stdout and "average weight bits 2.02" in proc.stdout

    with open(out / "results.json") as fh:
        res = json.load(fh)
    # the keys benchmarks/qat_accuracy.py reads (summarise), with sane values
    for key in ("fp_top1", "top1", "top5", "average_weight_bits", "epoch_time_s", "quantization_config", "bit_map"):
        assert key in res, key
    assert 0.0 <= res["top1"] <= res["top5"] <= 1.0 and 0.0 <= res["fp_top1"] <= 1.0
    assert res["average_weight_bits"] == pytest.approx(2.017, abs=0.01)
    assert len(res["epoch_time_s"]) == 1 and res["epoch_time_s"][0] > 0
    assert res["quantization_config"]["backend"] == "brevitas" and res["quantization_config"]["activation_bits"] == 2
    assert len(res["bit_map"]) == 22 and res["bit_map"]["conv1"]["weight_bits"] == 8
    assert res["bit_map"]["fc"]["weight_bits"] == 8 and res["bit_map"]["layer3.2.conv2"]["weight_bits"] == 2
    assert all(set(b) == {"weight_bits", "activation_bits", "params"} for b in res["bit_map"].values())
    assert res["command"].startswith("python recipes/qat_imagenet.py --config")

    # the recipe's training loop ran: 6 logged QAT steps whose loss moves, then one evaluation
    with open(out / "metrics.jsonl") as fh:
        records = [json.loads(line) for line in fh]
    losses = [r["loss"] for r in records if r["stage"] == "qat" and "loss" in r]
    assert len(losses) == 6 and len(set(losses)) > 1, losses
    assert [r["top1"] for r in records if r["stage"] == "qat" and "top1" in r] == [res["top1"]]
    # the same cached teacher file every other row uses
    (teacher,) = (tmp_path / "cache" / "teachers").glob("*.safetensors")

    # final/ reloads into the same brevitas model
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import brevitas_qat

    model = brevitas_qat.load_final(str(out / "final"))
    assert len(brevitas_peer.quantized_layers(model)) == 22
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_bad_quantization_key_is_one_line(tmp_path):
    # the whole section: `--set quantization.KEY=...` replaces the section with that one key (load_config)
    bad = "{backend: brevitas, weight_bits: 2, activation_bits: 2, weight_quantizer: lsq}"
    proc = subprocess.run(tiny(tmp_path, tmp_path / "o", quantization=bad), env=env(), capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip() and "CUDA" not in line
             and "hadamard" not in line]
    assert len(lines) == 1 and lines[0].startswith("error:") and "weight_quantizer" in lines[0], proc.stderr[-2000:]
