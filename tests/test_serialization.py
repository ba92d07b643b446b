"""Packed safetensors checkpoints: exact reload through timm's ``local-dir:``, config.json layout,
size, and clear errors for files that do not fit."""

import json
import os
import shutil

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import adq_hf
from adq_hf import ADQConfig
from adq_hf.serialization import CheckpointError

INPUT = (2, 3, 32, 32)


pytestmark = pytest.mark.usefixtures("one_thread")


def trained_model(config, num_classes=10):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=num_classes, quantization_config=config)
    x = torch.randn(*INPUT)
    adq_hf.calibrate_activations(model, [x])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(2):  # move weights, codebooks (EMA), steps and thresholds away from their initial values
        model(x).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), x


CONFIGS = [
    ADQConfig(weight_bits=2, activation_bits=None),
    ADQConfig(weight_bits=2, activation_bits=2, granularity="per_channel"),
    ADQConfig(weight_bits=3, activation_bits=3, activation_quantizer="lsq"),
    ADQConfig(weight_bits=4, activation_bits=None, granularity="per_channel", layer_bits={r"layer1\..*": 5}),
    ADQConfig(weight_bits=4, activation_bits=4, weight_quantizer="lsq", activation_quantizer="lsq"),
    ADQConfig(weight_bits=3, activation_bits=None, weight_quantizer="lsq", granularity="per_channel"),
    ADQConfig(weight_bits=2, activation_bits=None, weight_quantizer="lsq", last_layer_bits=None),
    ADQConfig(weight_bits=3, activation_bits=3, weight_quantizer="lsq", granularity="per_channel"),
]


def _ids(config):
    act = f"a{config.activation_bits}{config.activation_quantizer}" if config.activation_bits else "wonly"
    return f"{config.weight_quantizer}-w{config.weight_bits}-{act}-{config.granularity}"


@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
def test_save_and_reload_reproduces_outputs_exactly(tmp_path, config):
    model, x = trained_model(config)
    with torch.no_grad():
        expected = model(x)
    adq_hf.save_pretrained(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    reloaded = timm.create_model(f"local-dir:{tmp_path}").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), expected)
    assert reloaded.quantization_config == config
    assert adq_hf.bit_map(reloaded) == adq_hf.bit_map(model)
    state, again = model.state_dict(), reloaded.state_dict()
    for name, layer in adq_hf.quantized_layers(model):  # latent weights come back as their quantized values
        assert torch.equal(again[f"{name}.weight"], layer.quantized_weight().detach())
    for key, value in state.items():
        if not key.endswith(".weight") or key[: -len(".weight")] not in dict(adq_hf.quantized_layers(model)):
            assert torch.equal(again[key], value), key  # every other tensor exactly, quantizer state included
    # the packed file beats the float32 state dict of the same model
    float_file = tmp_path / "float.safetensors"
    save_file({k: v.float().contiguous() for k, v in timm.create_model("test_resnet", num_classes=10).state_dict().items()},
              str(float_file))
    assert os.path.getsize(tmp_path / "model.safetensors") < 0.75 * os.path.getsize(float_file)


def test_forward_overriding_timm_convs_round_trip(tmp_path):
    from timm.layers import Conv2dSame, ScaledStdConv2dSame, StdConv2d

    from adq_hf.serialization import load_file as load_packed, save_file as save_packed

    def build():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), Conv2dSame(4, 6, 3, stride=2), StdConv2d(6, 6, 3, padding=1),
                                   ScaledStdConv2dSame(6, 5, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3))

    torch.manual_seed(0)
    config = ADQConfig(weight_bits=2, activation_bits=3)
    x = torch.randn(2, 3, 9, 9)
    model = build()
    model(x)  # materialise the lazy Linear
    adq_hf.quantize_model(model, config, calibration_data=[x])
    model.eval()
    with torch.no_grad():
        expected = model(x)
    save_packed(model, str(tmp_path / "m.safetensors"))
    torch.manual_seed(1)
    other = build()
    other(x)
    adq_hf.quantize_model(other, config)
    load_packed(other, str(tmp_path / "m.safetensors"))
    with torch.no_grad():
        assert torch.equal(other.eval()(x), expected)


def test_reloaded_model_keeps_training(tmp_path):
    model, x = trained_model(ADQConfig(weight_bits=2, activation_bits=2))
    adq_hf.save_pretrained(model, str(tmp_path))
    reloaded = timm.create_model(f"local-dir:{tmp_path}").train()
    reloaded(x).logsumexp(-1).mean().backward()
    assert reloaded.layer1[0].conv1.latent_weight().grad is not None


def test_config_json_layout(tmp_path):
    model, _ = trained_model(ADQConfig(weight_bits=2, layer_bits={"fc": 4}), num_classes=7)
    adq_hf.save_pretrained(model, str(tmp_path), data_config={"input_size": (3, 32, 32)})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 7
    assert "num_classes" not in config.get("model_args", {})
    assert "quantization_config" not in config.get("model_args", {})
    assert config["quantization_config"] == ADQConfig(weight_bits=2, layer_bits={"fc": 4}).to_dict()
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert timm.create_model(f"local-dir:{tmp_path}").num_classes == 7
    with open(tmp_path / "model.safetensors", "rb") as fh:  # the header names the format and the layers
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    meta = header["__metadata__"]
    assert meta["format"] == "pt" and meta["adq_hf_format"] == "1"
    layers = json.loads(meta["layers"])
    assert layers["fc"] == {"shape": [7, 96], "bits": 4, "dtype": "torch.float32"}
    assert header["fc.weight"]["dtype"] == "U8" and header["fc.weight"]["shape"] == [7 * 96 * 4 // 8]
    assert "layer1.0.conv1.weight_quantizer.codebook" in header  # the float weight itself is not stored


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved")
    model, x = trained_model(ADQConfig(weight_bits=2, activation_bits=3))
    adq_hf.save_pretrained(model, str(path))
    return path


@pytest.fixture
def saved(saved_dir, tmp_path):
    """A fresh copy of a saved checkpoint that a test may damage."""
    path = tmp_path / "ckpt"
    shutil.copytree(saved_dir, path)
    return path


def _edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def test_bits_that_do_not_match_the_config(saved):
    _edit_config(saved, lambda c: c["quantization_config"].update(weight_bits=3))
    with pytest.raises(CheckpointError, match=r"layer 'conv1\.3' is stored as 2-bit \[16, 16, 3, 3\], but the model "
                                              r"expects 3-bit \[16, 16, 3, 3\]"):
        timm.create_model(f"local-dir:{saved}")


def test_shapes_that_do_not_match_the_config(saved):
    _edit_config(saved, lambda c: c.update(num_classes=5))
    with pytest.raises(CheckpointError, match=r"'fc' is stored as 8-bit \[10, 96\], but the model expects 8-bit \[5, 96\]"):
        timm.create_model(f"local-dir:{saved}")


def test_granularity_that_does_not_match_the_config(saved):
    _edit_config(saved, lambda c: c["quantization_config"].update(granularity="per_channel"))
    with pytest.raises(CheckpointError, match=r"(?s)does not match the model.*size mismatch for .*weight_quantizer\.codebook"):
        timm.create_model(f"local-dir:{saved}")


def test_float_layer_that_does_not_match(saved):
    _edit_config(saved, lambda c: c["quantization_config"].update(last_layer_bits=None))
    with pytest.raises(CheckpointError, match=r"does not match the model's quantized layers \(missing in file: \[\], "
                                              r"not in model: \['fc'\]\)"):
        timm.create_model(f"local-dir:{saved}")


def test_truncated_file(saved):
    data = (saved / "model.safetensors").read_bytes()
    for length in (len(data) - 100, len(data) // 2, 20, 3, 0):
        (saved / "model.safetensors").write_bytes(data[:length])
        with pytest.raises(CheckpointError, match="model.safetensors is damaged or truncated"):
            timm.create_model(f"local-dir:{saved}")


def test_pickle_file_is_refused(saved):
    state = {k: v.clone() for k, v in load_file(str(saved / "model.safetensors")).items()}  # (not memory-mapped)
    torch.save(state, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"is a pickle \(torch.save\) file; adq_hf only loads safetensors"):
        timm.create_model(f"local-dir:{saved}")
    torch.save(state, saved / "model.safetensors", _use_new_zipfile_serialization=False)  # legacy format
    with pytest.raises(CheckpointError, match="pickle"):
        timm.create_model(f"local-dir:{saved}")


def test_float_checkpoint_is_not_an_adq_checkpoint(saved):
    save_file(timm.create_model("test_resnet", num_classes=10).state_dict(), str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match="is not an adq_hf quantized checkpoint"):
        timm.create_model(f"local-dir:{saved}")
    save_file(timm.create_model("test_resnet", num_classes=10).state_dict(), str(saved / "model.safetensors"),
              metadata={"format": "pt"})  # what timm's own save_for_hf writes
    with pytest.raises(CheckpointError, match="is not an adq_hf quantized checkpoint"):
        timm.create_model(f"local-dir:{saved}")


def _rewrite(path, edit_tensors=None, edit_meta=None):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(path), metadata=meta)


def _header_length(path):
    with open(path, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        return length, len(fh.read(length).rstrip(b" "))


@pytest.mark.parametrize("first_bytes", [b"\x80", b"PK"])
def test_valid_file_whose_header_length_looks_like_pickle(saved, first_bytes):
    """A safetensors file starts with its header length: its first bytes can be 0x80 or "PK"."""
    file = saved / "model.safetensors"
    _rewrite(file, edit_meta=lambda m: m.update(pad=""))
    _, json_length = _header_length(file)
    low = int.from_bytes(first_bytes, "little")
    modulus = 256 ** len(first_bytes)
    target = json_length + (low - json_length) % modulus  # the next length with those first bytes (a multiple of 8)
    _rewrite(file, edit_meta=lambda m: m.update(pad="a" * (target - json_length)))
    assert file.read_bytes()[: len(first_bytes)] == first_bytes
    model = timm.create_model(f"local-dir:{saved}")  # loads
    assert model.layer1[0].conv1.weight_bits == 2
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])  # and a damaged one is reported as damaged, not as a pickle
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        timm.create_model(f"local-dir:{saved}")


def test_damaged_codes_version_and_missing_tensors(saved):
    file = saved / "model.safetensors"
    original = file.read_bytes()
    _rewrite(file, edit_tensors=lambda t: t.update({"fc.weight": t["fc.weight"][:-1].clone()}))
    with pytest.raises(CheckpointError, match=r"'fc.weight' has 959 bytes, expected 960: the file is damaged"):
        timm.create_model(f"local-dir:{saved}")
    file.write_bytes(original)
    _rewrite(file, edit_tensors=lambda t: t.pop("fc.weight"))
    with pytest.raises(CheckpointError, match=r"lacks 'fc.weight'"):
        timm.create_model(f"local-dir:{saved}")
    file.write_bytes(original)
    _rewrite(file, edit_tensors=lambda t: t.pop("fc.bias"))
    with pytest.raises(CheckpointError, match=r"does not match the model: missing \['fc.bias'\]"):
        timm.create_model(f"local-dir:{saved}")
    file.write_bytes(original)
    _rewrite(file, edit_meta=lambda m: m.update(adq_hf_format="2"))
    with pytest.raises(CheckpointError, match="format version '2'; this adq_hf reads version 1: upgrade adq_hf"):
        timm.create_model(f"local-dir:{saved}")
    os.remove(file)
    with pytest.raises(FileNotFoundError, match="model.safetensors does not exist"):
        timm.create_model(f"local-dir:{saved}")


def test_unknown_quant_method_and_unquantized_save(saved, tmp_path):
    _edit_config(saved, lambda c: c["quantization_config"].update(quant_method="gptq"))
    with pytest.raises(CheckpointError, match="quant_method='gptq', which adq_hf does not read"):
        timm.create_model(f"local-dir:{saved}")
    _edit_config(saved, lambda c: c["quantization_config"].update(quant_method="adq", weight_bits=9))
    with pytest.raises(ValueError, match=r"ADQConfig.weight_bits=9 is invalid"):
        timm.create_model(f"local-dir:{saved}")
    with pytest.raises(ValueError, match="quantized by adq_hf"):
        adq_hf.save_pretrained(timm.create_model("test_resnet"), str(tmp_path / "float"))


def test_architecture_only_and_passed_config_is_ignored_with_a_warning(saved):
    model = timm.create_model(f"local-dir:{saved}", pretrained=False)
    assert model.layer1[0].conv1.weight_bits == 2  # built and quantized from config.json, nothing loaded
    with pytest.warns(UserWarning, match="already quantized; its own quantization_config is used"):
        model = timm.create_model(f"local-dir:{saved}", quantization_config=ADQConfig(weight_bits=4))
    assert model.layer1[0].conv1.weight_bits == 2


def test_plain_timm_refuses_the_packed_checkpoint(saved):
    """Without adq_hf's create_model, timm must not silently build a float model from it."""
    from adq_hf.integrations.timm import _timm_create_model

    with pytest.raises(RuntimeError, match="size mismatch for conv1.0.weight"):
        _timm_create_model(f"local-dir:{saved}", pretrained=True)
