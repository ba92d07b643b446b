"""Post-training quantization: solvers against exhaustive references and against each other on
real Hessians (real Fashion-MNIST images through a timm ResNet-20, real MiniLM weights and
sentences), and the whole pipeline on a real model."""


import pytest
import timm
import torch

import adq_hf
from adq_hf import ADQConfig
from adq_hf.ptq import (SOLVERS, collect_hessian, layer_error, nearest_level, prepare_hessian, quantize,
                        quantize_layer, row_tables)
from adq_hf.serialization import load_file, save_file
from conftest import fashion_mnist_batches

pytestmark = pytest.mark.usefixtures("one_thread")


def _uniform_tables(w, bits):
    """Per-row symmetric uniform grids covering each row's range."""
    scale = w.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1))
    ints = torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=torch.float64)
    return (scale * ints).contiguous()


def _random_problem(rows=3, cols=6, samples=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, cols, generator=g, dtype=torch.float64) @ torch.randn(cols, cols, generator=g, dtype=torch.float64)
    h = 2 * x.T @ x / samples
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return w, h


def _exhaustive_greedy_row(w0, h, table, outliers=False):
    """OBQ's definition, computed by brute force: at each step try every unquantized weight, fix it to
    its nearest level, re-solve the remaining weights by least squares, keep the cheapest. With
    ``outliers``: a weight whose rounding error exceeds half the largest level gap goes first."""
    cols = len(w0)
    w, fixed = w0.clone(), {}
    limit = float((table[1:] - table[:-1]).max()) / 2
    for _ in range(cols):
        best = None
        free = [j for j in range(cols) if j not in fixed]
        errors = {j: abs(float(w[j]) - nearest_level(w[j].view(1, 1), table.view(1, -1)).item()) for j in free}
        if outliers and max(errors.values()) > limit:
            free = [max(free, key=lambda j: errors[j])]
        for j in free:
            trial_fixed = dict(fixed)
            trial_fixed[j] = nearest_level(w[j].view(1, 1), table.view(1, -1)).item()
            trial = _optimal_rest(w0, h, trial_fixed)
            d = trial - w0
            cost = float(d @ h @ d)
            if best is None or cost < best[0] - 1e-12:
                best = (cost, j, trial, trial_fixed)
        _, _, w, fixed = best
    return w


def _optimal_rest(w0, h, fixed):
    """argmin over the free weights of (w - w0)^T H (w - w0) with the fixed ones set."""
    idx_f = torch.tensor(sorted(fixed))
    free = torch.tensor([j for j in range(len(w0)) if j not in fixed], dtype=torch.long)
    w = w0.clone()
    w[idx_f] = torch.tensor([fixed[j] for j in sorted(fixed)], dtype=w0.dtype)
    if len(free):
        delta_f = w[idx_f] - w0[idx_f]
        rhs = -h[free][:, idx_f] @ delta_f
        w[free] = w0[free] + torch.linalg.solve(h[free][:, free], rhs)
    return w


def test_obq_equals_exhaustive_greedy_on_a_tiny_layer():
    w, h = _random_problem()
    tables = _uniform_tables(w, 2)
    hd = prepare_hessian(h, damp=0.0)
    obq = SOLVERS["obq"](w, hd, tables, outliers=False)
    for r in range(w.shape[0]):
        expected = _exhaustive_greedy_row(w[r], hd, tables[r])
        torch.testing.assert_close(obq[r], expected, rtol=0, atol=1e-9)
    assert all(v in set(tables[r].tolist()) for r in range(3) for v in obq[r].tolist())


@pytest.mark.parametrize("method", ["gptq", "obq", "sa"])
def test_diagonal_hessian_gives_round_to_nearest_exactly(method):
    w, _ = _random_problem(rows=5, cols=9)
    h = torch.diag(torch.rand(9, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.1)
    tables = _uniform_tables(w, 3)
    assert torch.equal(SOLVERS[method](w, prepare_hessian(h), tables), SOLVERS["rtn"](w, h, tables))


def test_gptq_without_act_order_on_one_column_block_is_the_textbook_recursion():
    """GPTQ's lazy block update equals updating every later column right after each column."""
    w, h = _random_problem(rows=4, cols=7, seed=3)
    hd, tables = prepare_hessian(h), _uniform_tables(w, 2)
    lazy = SOLVERS["gptq"](w, hd, tables, act_order=False, block_size=3)
    eager = SOLVERS["gptq"](w, hd, tables, act_order=False, block_size=1)
    torch.testing.assert_close(lazy, eager, rtol=0, atol=1e-10)


@pytest.fixture(scope="module")
def fmnist_batches():
    return fashion_mnist_batches(256, batch_size=64)


def _resnet(bits=2, seed=0, **kw):
    torch.manual_seed(seed)
    model = timm.create_model("resnet20_cifar", num_classes=10, in_chans=1)
    adq_hf.quantize_model(model, ADQConfig(weight_bits=bits, activation_bits=None, **kw))
    return model.eval()


@pytest.mark.parametrize("bits", [2, 3])
def test_compensating_methods_beat_rtn_on_real_conv_hessians(fmnist_batches, bits):
    model = _resnet(bits, granularity="per_channel")
    for name in ("layer1.0.conv1", "layer2.1.conv2", "layer3.0.downsample.0"):
        layer = model.get_submodule(name)
        h = collect_hessian(model, layer, fmnist_batches)
        w = layer.latent_weight().detach().reshape(layer.out_channels, -1).to(torch.float64)
        tables = row_tables(layer.weight_quantizer.levels(), w.shape[0])
        hd = prepare_hessian(h)
        rtn = layer_error(w, SOLVERS["rtn"](w, hd, tables), h)
        for method in ("gptq", "sa", "obq"):
            q = SOLVERS[method](w, hd, tables)
            assert torch.equal(nearest_level(q, tables), q)  # on the layer's own levels
            assert layer_error(w, q, h) <= rtn, (name, method)
        assert layer_error(w, SOLVERS["sa"](w, hd, tables), h) < 0.8 * rtn


def test_padding_tokens_stay_out_of_the_hessian():
    """A padded batch gives the Hessian of its real tokens: the same as each sentence on its own."""
    from transformers import AutoModel, AutoTokenizer

    from adq_hf.data import minilm_path

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, quantization_config=ADQConfig(weight_bits=4, activation_bits=None)).eval()
    sentences = ["Short.", "This sentence is a good deal longer than the first one, so it sets the padding."]
    padded = dict(tokenizer(sentences, padding=True, return_tensors="pt"))
    assert (padded["attention_mask"] == 0).sum() > 10
    alone = [dict(tokenizer([s], return_tensors="pt")) for s in sentences]
    for layer in (model.encoder.layer[0].attention.self.query, model.encoder.layer[2].output.dense):
        h_padded, h_alone = collect_hessian(model, layer, [padded]), collect_hessian(model, layer, alone)
        assert torch.allclose(h_padded, h_alone, rtol=1e-4, atol=1e-6 * h_alone.abs().max().item())


def test_compensating_methods_beat_rtn_on_a_real_minilm_layer():
    from transformers import AutoModel, AutoTokenizer

    from adq_hf.data import minilm_path

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, quantization_config=ADQConfig(weight_bits=3, activation_bits=None,
                                                                          granularity="per_channel")).eval()
    sentences = ["The cat sat quietly on the warm windowsill.", "Quantization reduces the memory a model needs.",
                 "Rain is expected in the northern valleys tomorrow.", "She paid for the groceries with cash.",
                 "The committee postponed its decision until March.", "Fresh bread smells better than anything."]
    batches = [dict(tokenizer(sentences, padding=True, return_tensors="pt"))]
    layer = model.encoder.layer[0].attention.self.query
    h = collect_hessian(model, layer, batches)
    w = layer.latent_weight().detach().to(torch.float64)
    tables = row_tables(layer.weight_quantizer.levels(), w.shape[0])
    rtn = layer_error(w, nearest_level(w, tables), h)
    for method in ("gptq", "sa"):
        assert layer_error(w, SOLVERS[method](w, prepare_hessian(h), tables), h) < rtn


def test_quantize_pipeline_on_resnet20_saves_loads_and_reestimates_batchnorm(fmnist_batches, tmp_path):
    model = timm.create_model("resnet20_cifar", num_classes=10, in_chans=1).eval()
    before = model.layer1[0].bn1.running_mean.clone()
    config = ADQConfig(weight_bits=3, activation_bits=None, layer_bits={"layer1.0.conv1": 4})
    quantize(model, fmnist_batches, config, method="sa", progress=False)
    report = model.ptq_report
    assert set(report) == {n for n, _ in adq_hf.quantized_layers(model)}
    assert all(r["error"] <= r["rtn_error"] + 1e-12 for r in report.values())
    assert len(torch.unique(model.layer1[0].conv1.weight)) <= 16 and len(torch.unique(model.layer1[0].conv2.weight)) <= 8
    assert not torch.equal(model.layer1[0].bn1.running_mean, before)  # re-estimated
    x = fmnist_batches[0][0][:8]
    with torch.no_grad():
        expected = model(x)
    save_file(model, str(tmp_path / "m.safetensors"))
    fresh = timm.create_model("resnet20_cifar", num_classes=10, in_chans=1)
    adq_hf.quantize_model(fresh, config, init_from_weights=False)
    load_file(fresh, str(tmp_path / "m.safetensors"))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), expected)


def test_bad_input_gives_clear_errors_and_a_dead_input_falls_back_to_rtn(fmnist_batches):
    model = _resnet(2)
    with pytest.raises(ValueError, match="calibration_data is empty"):
        quantize(model, [], progress=False)
    with pytest.raises(ValueError, match="unknown PTQ method 'obs'"):
        quantize(model, fmnist_batches, method="obs", progress=False)
    with pytest.raises(ValueError, match="does not fit the model"):
        quantize(model, [torch.randn(2, 3, 28, 28)], progress=False)
    layer = model.layer1[0].conv1
    with pytest.raises(ValueError, match="Hessian \\[5, 5\\] does not match the layer's 144 input columns"):
        quantize_layer(layer, torch.eye(5))
    w = layer.latent_weight().detach().clone()
    report = quantize_layer(layer, torch.zeros(144, 144), method="sa")  # no input ever: singular Hessian
    expected = layer.weight_quantizer(w)
    assert torch.equal(layer.latent_weight(), expected) and report["error"] == 0.0
    with pytest.raises(ValueError, match="model is not quantized: pass an ADQConfig"):
        quantize(timm.create_model("resnet20_cifar", num_classes=10, in_chans=1), fmnist_batches, progress=False)


def test_command_line_ptq_saves_a_loadable_quantized_model(tmp_path, capsys):
    from adq_hf.cli import main

    out = tmp_path / "ptq"
    assert main(["ptq", "resnet20_cifar", "--in-chans", "1", "--num-classes", "10", "--input-size", "1", "28", "28",
                 "--bits", "3", "--method", "gptq", "--num-batches", "2", "--batch-size", "32", "--no-progress",
                 "--out", str(out)]) == 0
    assert "PTQ (gptq) of 22 layers" in capsys.readouterr().out
    model = timm.create_model(f"local-dir:{out}")
    assert model.layer2[0].conv1.weight_bits == 3 and (out / "bit_report.md").is_file()


@pytest.mark.slow
def test_recipe_init_ptq_starts_qat_from_the_ptq_model(tmp_path):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, os.path.join(root, "recipes", "qat_imagenet.py"), "--config",
           os.path.join(root, "recipes", "configs", "fmnist_resnet20_w2a2.yaml"), "--output-dir", str(tmp_path),
           "--init", "ptq", "--set", "teacher.checkpoint=null", "data.train_limit=64", "data.eval_limit=64",
           "data.batch_size=32", "optim.max_steps=2", "calibration.num_batches=2", "ptq.method=gptq"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PTQ (gptq) initialisation done" in proc.stdout + proc.stderr
    assert (tmp_path / "final" / "model.safetensors").is_file()
    bad_cmd = [c for c in cmd if c not in ("--init", "ptq")] + ["init=random"]
    bad = subprocess.run(bad_cmd, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "init='random': choose 'weights' or 'ptq'" in bad.stderr
