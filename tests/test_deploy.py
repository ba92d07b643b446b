"""Deploy mode (adq_hf.deploy): packed codes + look-up tables in memory, exact outputs, save/load,
resident memory, ONNX in onnxruntime, refusal to train, timm deploy=True, MiniLM, CLI and B3."""

import copy
import json
import math
import os
import sys

import pytest
import timm
import torch
from safetensors import safe_open

import adq_hf
from adq_hf import ADQConfig
from adq_hf.deploy import (
    DeployedLayerMixin,
    OnnxMismatchError,
    TrainingRefusedError,
    convert_for_inference,
    export_onnx,
    is_deployed,
    memory_report,
    n2uq_thresholds,
    onnx_session,
    resident_bytes,
    set_exact,
    set_weight_cache,
    verify_onnx,
)
from adq_hf.packing import pack_codes, unpack_codes

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = (1, 28, 28)
CONFIGS = [
    ADQConfig(weight_bits=2, activation_bits=2),
    ADQConfig(weight_bits=3, activation_bits=3, weight_quantizer="lsq", activation_quantizer="lsq",
              granularity="per_channel"),
    ADQConfig(weight_bits=4, activation_bits=None, granularity="per_channel", layer_bits={r"layer1\..*": 5}),
    ADQConfig(weight_bits=3, activation_bits=4, weight_quantizer="lsq"),
    ADQConfig(weight_bits=7, activation_bits=8, first_layer_bits=6, last_layer_bits=None),
    ADQConfig(weight_bits=3, activation_bits=3, weight_quantizer="post", activation_quantizer="asq"),
]


def _ids(config):
    act = f"a{config.activation_bits}{config.activation_quantizer}" if config.activation_bits else "wonly"
    return f"{config.weight_quantizer}-w{config.weight_bits}-{act}-{config.granularity}"


def trained_resnet(config, steps=2):
    """resnet20_cifar on Fashion-MNIST shapes, a few SGD steps so codebooks, steps and thresholds moved."""
    torch.manual_seed(0)
    model = timm.create_model("resnet20_cifar", num_classes=10, in_chans=1, quantization_config=config)
    x = torch.randn(8, *FMNIST)
    adq_hf.calibrate_activations(model, [x])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        model(x).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), x


def assert_same_checkpoint(folder, other):
    """Same header metadata and tensors (the bytes may differ: safetensors writes metadata in hash order)."""
    files = []
    for path in (folder, other):
        with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
            files.append((f.metadata(), {k: f.get_tensor(k) for k in f.keys()}))
    (meta, tensors), (other_meta, other_tensors) = files
    assert meta == other_meta and tensors.keys() == other_tensors.keys()
    for key, tensor in tensors.items():
        assert tensor.dtype == other_tensors[key].dtype and torch.equal(tensor, other_tensors[key]), key


@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
def test_deploy_outputs_equal_fake_quant_eval_bit_for_bit(config):
    model, x = trained_resnet(config)
    batch = torch.randn(16, *FMNIST)
    with torch.no_grad():
        expected, expected_batch = model(x), model(batch)
        expected_one = model(x[:1])
    convert_for_inference(model, exact=True)
    layers = adq_hf.quantized_layers(model)
    assert layers and all(isinstance(m, DeployedLayerMixin) for _, m in layers)
    for _, layer in layers:  # packed codes only: no float weight parameter left
        assert "weight" not in layer._parameters and layer.packed_weight.dtype == torch.uint8
        bits = layer.weight_bits
        assert layer.packed_weight.numel() == math.ceil(math.prod(layer.weight_shape) * bits / 8)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
        assert torch.equal(model(batch), expected_batch)
        assert torch.equal(model(x[:1]), expected_one)
        # default: the classifier (the only Linear) at batch 1 runs the fused kernel: float reassociation
        set_exact(model, False)
        fused = isinstance(model.fc, DeployedLayerMixin)  # not with last_layer_bits=None
        assert not fused or model.fc.fused_linear(torch.randn(1, model.fc.in_features)) is not None
        got = model(x[:1])
        assert torch.equal(model(batch), expected_batch)  # 16 rows: decoded weight, F.linear
    assert (got - expected_one).abs().max() <= 1e-5 * expected_one.abs().max()


def test_bit_map_and_average_bits_read_deployed_models():
    model, _ = trained_resnet(ADQConfig(weight_bits=2, activation_bits=2, layer_bits={r"layer3\..*": 4}))
    bits, average = adq_hf.bit_map(model), adq_hf.average_weight_bits(model, include_float=True)
    convert_for_inference(model)
    assert adq_hf.bit_map(model) == bits and adq_hf.average_weight_bits(model, include_float=True) == average


def test_forward_overriding_timm_convs_deploy_exactly():
    from timm.layers import Conv2dSame, ScaledStdConv2dSame, StdConv2d

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), Conv2dSame(4, 6, 3, stride=2), StdConv2d(6, 6, 3, padding=1),
                                ScaledStdConv2dSame(6, 5, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    x = torch.randn(2, 3, 9, 9)
    model(x)
    adq_hf.quantize_model(model, ADQConfig(weight_bits=2, activation_bits=3), calibration_data=[x])
    model.eval()
    with torch.no_grad():
        expected = model(x)
    convert_for_inference(model, exact=True)
    assert type(model[1]).__name__ == "DeployedConv2dSame" and isinstance(model[1], Conv2dSame)
    assert isinstance(model[2], StdConv2d) and isinstance(model[3], ScaledStdConv2dSame)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_round_trip_fake_quant_deploy_save_load(tmp_path):
    model, x = trained_resnet(ADQConfig(weight_bits=2, activation_bits=2, granularity="per_channel"))
    with torch.no_grad():
        expected = model(x)
    adq_hf.save_pretrained(model, str(tmp_path / "fake_quant"))
    convert_for_inference(model)
    adq_hf.save_pretrained(model, str(tmp_path / "deployed"))  # the codes are already there: same checkpoint
    assert (tmp_path / "deployed" / "config.json").read_text() == (tmp_path / "fake_quant" / "config.json").read_text()
    assert_same_checkpoint(tmp_path / "deployed", tmp_path / "fake_quant")
    for folder in ("fake_quant", "deployed"):
        deployed = timm.create_model(f"local-dir:{tmp_path / folder}", deploy=True)
        fake_quant = timm.create_model(f"local-dir:{tmp_path / folder}").eval()
        assert is_deployed(deployed) and not is_deployed(fake_quant)
        set_exact(deployed)
        with torch.no_grad():
            assert torch.equal(deployed(x), expected)
            assert torch.equal(fake_quant(x), expected)
    adq_hf.save_pretrained(deployed, str(tmp_path / "again"))  # loaded in deploy form, saved again: unchanged
    assert_same_checkpoint(tmp_path / "again", tmp_path / "fake_quant")


def test_timm_deploy_keyword_needs_a_quantized_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="convert_for_inference"):
        timm.create_model("resnet20_cifar", num_classes=10, in_chans=1, deploy=True)
    model, _ = trained_resnet(ADQConfig(weight_bits=2), steps=0)
    adq_hf.save_pretrained(model, str(tmp_path))
    with pytest.raises(ValueError, match="pretrained=False"):
        timm.create_model(f"local-dir:{tmp_path}", pretrained=False, deploy=True)


def test_resident_weight_memory_is_close_to_the_information_limit():
    model, x = trained_resnet(ADQConfig(weight_bits=2, activation_bits=2), steps=0)
    before = memory_report(model)
    convert_for_inference(model, exact=True)
    after = memory_report(model)
    limit = after["information_limit_bytes"]
    assert limit == before["information_limit_bytes"]
    params = sum(math.prod(m.weight_shape) for _, m in adq_hf.quantized_layers(model))
    bits = sum(math.prod(m.weight_shape) * m.weight_bits for _, m in adq_hf.quantized_layers(model))
    assert bits / 8 < limit < bits / 8 + 64 * 4 * len(adq_hf.quantized_layers(model))  # codes + tables
    assert limit <= after["quantized_weight_bytes"] <= 1.02 * limit  # byte padding and 2 step counters per layer
    assert after["fp32_weight_bytes"] == 4 * params and before["quantized_weight_bytes"] > after["fp32_weight_bytes"]
    assert after["resident_bytes"] < 0.1 * before["resident_bytes"]
    assert resident_bytes(model) == after["resident_bytes"]
    # a cache under a budget keeps some decoded weights: more memory, same outputs
    with torch.no_grad():
        expected = model(x)
    budget = 100_000
    cached = set_weight_cache(model, budget)
    assert 0 < cached <= budget and resident_bytes(model) == after["resident_bytes"] + cached
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    set_weight_cache(model, 0)
    assert resident_bytes(model) == after["resident_bytes"]


def test_deployed_model_refuses_training_with_a_clear_error():
    model, x = trained_resnet(ADQConfig(weight_bits=2, activation_bits=2), steps=0)
    convert_for_inference(model)
    with pytest.raises(RuntimeError, match="load the fake-quant model for training"):
        model.train()
    model.eval()
    with pytest.raises(TrainingRefusedError, match="deploy mode"):
        model(x).sum().backward()
    with pytest.raises(RuntimeError, match="no float weights to train"):
        model.conv1.latent_weight()
    assert not any(p.requires_grad for _, m in adq_hf.quantized_layers(model) for p in m.parameters())
    with torch.no_grad():  # still fine for inference
        assert model(x).shape == (8, 10)


def test_decode_and_packing_match_the_reference_bit_order():
    def reference_pack(codes, bits):  # the format's definition: one LSB-first bit stream
        stream = [(int(c) >> k) & 1 for c in codes for k in range(bits)]
        stream += [0] * (-len(stream) % 8)
        return [sum(stream[i + k] << k for k in range(8)) for i in range(0, len(stream), 8)]

    torch.manual_seed(0)
    for bits in range(1, 9):
        for n in (1, 5, 8, 13, 64, 101):
            codes = torch.randint(0, 2**bits, (n,))
            packed = pack_codes(codes, bits)
            assert packed.tolist() == reference_pack(codes, bits)
            assert torch.equal(unpack_codes(packed, bits, n), codes)
    assert pack_codes(torch.tensor([1, 2, 3, 0, 1]), 2).tolist() == [0x39, 0x01]


def test_n2uq_thresholds_reproduce_the_quantizer_at_every_boundary():
    from adq_hf.quantizers import N2UQActivationQuantizer

    torch.manual_seed(0)
    for trial in range(40):
        bits = (2, 3, 4, 8)[trial % 4]
        quantizer = N2UQActivationQuantizer(bits)
        sample = torch.randn(500) * 10 ** float(torch.empty(()).uniform_(-2, 2))
        quantizer.init_from(sample if trial % 2 else sample.relu())
        with torch.no_grad():  # uneven intervals, as training leaves them
            quantizer.raw_intervals.mul_(torch.empty(2**bits - 1).uniform_(0.2, 3))
        thresholds = n2uq_thresholds(quantizer)
        down, up = torch.full_like(thresholds, -math.inf), torch.full_like(thresholds, math.inf)
        x = torch.cat([thresholds, torch.nextafter(thresholds, down), torch.nextafter(thresholds, up), sample,
                       torch.tensor([0.0, -1e30, 1e30])])
        with torch.no_grad():
            count = torch.searchsorted(thresholds, x, right=True).to(x.dtype)
            assert torch.equal(quantizer.scale * (count + quantizer.zero_point), quantizer(x))


def _onnx_graph(path):
    import onnx

    return onnx.load(path).graph


@pytest.mark.parametrize("config", [ADQConfig(weight_bits=3), ADQConfig(weight_bits=2, activation_bits=2),
                                    ADQConfig(weight_bits=3, activation_bits=3, weight_quantizer="post",
                                              activation_quantizer="asq"),
                                    ADQConfig(weight_bits=4, activation_bits=4, weight_quantizer="lsq",
                                              activation_quantizer="lsq", granularity="per_channel")], ids=_ids)
def test_onnx_export_runs_in_onnxruntime_like_pytorch(tmp_path, config):
    from onnx import TensorProto

    model, x = trained_resnet(config)
    path = str(tmp_path / "model.onnx")
    result = export_onnx(model, x[:1], path)  # a fake-quant model: converted on a copy
    assert not is_deployed(model) and result["rel_l2"] is not None and os.path.getsize(path) == result["bytes"]
    graph = _onnx_graph(path)
    initializers = {i.name: i for i in graph.initializer}
    for name, layer in adq_hf.quantized_layers(model):  # LUT form: packed uint8 codes, never float weights
        codes = initializers[f"{name}.weight"]
        assert codes.data_type == TensorProto.UINT8 and list(codes.dims) == [math.ceil(
            layer.latent_weight().numel() * layer.weight_bits / 8)]
    assert sum(n.op_type == "GatherElements" for n in graph.node) == len(adq_hf.quantized_layers(model))
    session = onnx_session(path)
    for batch in (1, 16):  # dynamic batch
        inputs = torch.randn(batch, *FMNIST)
        with torch.no_grad():
            expected = model(inputs)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0])
        if config.activation_bits is None:
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
        else:  # a float rounding difference may move an activation across a rounding boundary: one level
            assert (got - expected).norm() / expected.norm() < 0.1
            assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.9


def test_cli_export(tmp_path):
    from adq_hf.cli import main

    model, x = trained_resnet(ADQConfig(weight_bits=2, activation_bits=2), steps=0)
    adq_hf.save_pretrained(model, str(tmp_path / "ckpt"))
    out = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "ckpt"), str(out), "--input-size", *map(str, FMNIST)]) == 0
    session = onnx_session(str(out))
    assert session.get_inputs()[0].shape[1:] == list(FMNIST)


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoTokenizer

    from adq_hf.data import minilm_path

    path = minilm_path()
    batch = AutoTokenizer.from_pretrained(path)(["The quick brown fox jumps over the lazy dog.", "Small and fast."],
                                                padding=True, return_tensors="pt")
    return path, dict(batch)


def test_minilm_deploy_save_and_onnx(minilm, tmp_path):
    from transformers import AutoModel

    path, batch = minilm
    model = AutoModel.from_pretrained(path, quantization_config=ADQConfig(weight_bits=4)).eval()
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    model.save_pretrained(tmp_path / "fake_quant")
    assert adq_hf.convert_for_inference(model, exact=True) is model and is_deployed(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, expected)
    report = memory_report(model)
    assert report["quantized_weight_bytes"] <= 1.01 * report["information_limit_bytes"]
    assert report["quantized_weight_bytes"] < 0.13 * report["fp32_weight_bytes"]
    model.save_pretrained(tmp_path / "deployed")  # transformers' own save, through the HfQuantizer
    assert_same_checkpoint(tmp_path / "deployed", tmp_path / "fake_quant")
    reloaded = adq_hf.convert_for_inference(AutoModel.from_pretrained(tmp_path / "deployed"), exact=True)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).last_hidden_state, expected)
    with pytest.raises(RuntimeError, match="fake-quant model"):
        reloaded.train()
    result = export_onnx(reloaded, batch, str(tmp_path / "minilm.onnx"))
    assert result["rel_l2"] < 1e-5


def test_b3_quick_tier_writes_well_formed_results(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import deploy as bench

    assert bench.main(["--tier", "quick", "--models", "resnet20-w2a2", "minilm-w4", "decode", "--out",
                       str(tmp_path)]) == 0
    result = json.load(open(tmp_path / "deploy_quick.json"))
    assert [r["model"] for r in result["rows"]] == ["resnet20-w2a2", "minilm-w4"]
    assert {"machine", "commit", "time", "command", "kernels"} <= set(result)
    decode = result["decode"]  # the decode workload at tiny shapes: every variant in the same run
    assert set(decode["tokens_per_s"]) == {"fp32", "bf16", "adq-w4", "adq-w3", "adq-w4-exact", "adq-w4-emb4",
                                             "hqq-w4-g64"}
    assert all(v > 0 for v in decode["tokens_per_s"].values()) and decode["ratio_to_fp32"]["fp32"] == 1.0
    assert decode["resident_bytes"]["adq-w4"] < decode["resident_bytes"]["fp32"]
    assert decode["resident_bytes"]["adq-w4-emb4"] < decode["resident_bytes"]["adq-w4"]  # the tied table packed too
    for row in result["rows"]:
        assert row["deploy_equals_fake_quant"]
        assert row["checkpoint"]["packed_bytes"] < row["checkpoint"]["fp32_bytes"]
        for batch in ("1", "64"):
            assert {"fp", "deploy", "deploy-cache", "ort-fp", "ort-deploy"} <= set(row["latency_ms"][batch])
            assert all(v > 0 for v in row["latency_ms"][batch].values())
        assert all(v > 0 for v in row["load_ms"].values())
    text = (tmp_path / "deploy_quick.md").read_text()
    assert text.startswith("B3 deployment, tier quick") and "| adq-w4 |" in text


@pytest.mark.parametrize("bits", [5, 8])
def test_n2uq_onnx_two_level_count_equals_the_quantizer(bits):
    """Beyond 15 thresholds the exported form finds the group of 16 thresholds holding x, then counts
    within it: the same values as the quantizer, at every threshold and its neighbouring floats."""
    from types import SimpleNamespace

    from adq_hf.deploy.inputs import _n2uq_onnx_form
    from adq_hf.quantizers import N2UQActivationQuantizer

    torch.manual_seed(bits)
    for signed in (False, True):
        quantizer = N2UQActivationQuantizer(bits)
        sample = torch.randn(3000) * 2
        quantizer.init_from(sample if signed else sample.relu())
        with torch.no_grad():
            quantizer.raw_intervals.mul_(torch.empty(2**bits - 1).uniform_(0.1, 4))
        t = n2uq_thresholds(quantizer)
        layer = SimpleNamespace(_buffers={"input_thresholds": t}, input_quantizer=quantizer)
        layer.__dict__["_input_zero_point"] = quantizer.zero_point
        down, up = torch.full_like(t, -math.inf), torch.full_like(t, math.inf)
        x = torch.cat([t, torch.nextafter(t, down), torch.nextafter(t, up), sample, torch.tensor([-1e30, 1e30])])
        x = x[: len(x) // 7 * 7].reshape(-1, 7)  # any shape: the count works elementwise
        with torch.no_grad():
            assert torch.equal(_n2uq_onnx_form(layer, x), quantizer(x))


@pytest.fixture(scope="module")
def w8a8_vit_onnx(tmp_path_factory):
    """A deep W8A8 ViT (12 blocks, 32x32: 5 tokens) deployed and exported unverified. Deep enough that
    float rounding flips quantized activations in PyTorch's own float32 output too (issue 16)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=12,
                              quantization_config=ADQConfig(weight_bits=8, activation_bits=8))
    adq_hf.calibrate_activations(model, [torch.randn(4, 3, 32, 32) for _ in range(2)])
    deployed = convert_for_inference(model.eval(), exact=True)
    x = torch.randn(4, 3, 32, 32)
    path = str(tmp_path_factory.mktemp("vit") / "vit.onnx")
    export_onnx(deployed, x, path, verify=False)
    return deployed, x, path


@pytest.mark.slow  # the fixture: about 30 s
def test_onnx_vit_rounding_flips_pass_against_the_float64_result(w8a8_vit_onnx, monkeypatch):
    # at 224x224 a W8A8 ViT's cascade of flipped activations exceeded the fixed 0.1 (issue 16); at 32x32
    # it stays near 0.01, so the fixed tolerance is lowered here to make this size take the same path
    import adq_hf.deploy.onnx as deploy_onnx

    monkeypatch.setattr(deploy_onnx, "ACTIVATION_RTOL", 1e-3)
    deployed, x, path = w8a8_vit_onnx
    result = verify_onnx(deployed, x, path)
    assert result["rel_l2"] > 1e-3  # the runtimes' last-bit differences flipped activations
    errors = result["rel_l2_float64"]
    assert errors["pytorch"] > 1e-3  # ... as float32 rounding does within PyTorch against float64
    assert errors["onnxruntime"] <= deploy_onnx.ROUNDING_FACTOR * errors["pytorch"]
    with pytest.raises(OnnxMismatchError, match="relative L2"):  # an explicit rtol stays a plain bound
        verify_onnx(deployed, x, path, rtol=1e-3)


@pytest.mark.slow
def test_onnx_verify_rejects_a_graph_float_rounding_does_not_explain(w8a8_vit_onnx):
    deployed, x, path = w8a8_vit_onnx
    changed = copy.deepcopy(deployed)
    with torch.no_grad():
        changed.norm.weight.mul_(1.5)  # PyTorch now computes another function than the file
    with pytest.raises(OnnxMismatchError, match="computed in float64"):
        verify_onnx(changed, x, path)
