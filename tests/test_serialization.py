import json
import os

import pytest
import timm
import torch
from safetensors.torch import save_file

import adq_hf
from adq_hf import ADQConfig
from adq_hf.serialization import CheckpointError


def trained_model(config):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10, quantization_config=config)
    x = torch.randn(4, 3, 160, 160)
    adq_hf.calibrate_activations(model, [x])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(2):  # move weights, codebooks (EMA) and thresholds away from their initial values
        model(x).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), x


@pytest.mark.parametrize(
    "config",
    [
        ADQConfig(weight_bits=2, activation_bits=2),
        ADQConfig(weight_bits=3, activation_bits=None, granularity="per_channel"),
        ADQConfig(weight_bits=4, activation_bits=4, weight_quantizer="lsq", activation_quantizer="lsq"),
        ADQConfig(weight_bits=3, activation_bits=3, weight_quantizer="lsq", granularity="per_channel"),
    ],
)
def test_save_and_reload_reproduces_outputs_exactly(tmp_path, config):
    model, x = trained_model(config)
    with torch.no_grad():
        expected = model(x)
    adq_hf.save_pretrained(model, str(tmp_path))
    reloaded = timm.create_model(f"local-dir:{tmp_path}").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), expected)
    assert reloaded.quantization_config == config
    fp32_bytes = sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())
    assert os.path.getsize(tmp_path / "model.safetensors") < fp32_bytes


def test_config_json_layout(tmp_path):
    model, _ = trained_model(ADQConfig(weight_bits=2))
    adq_hf.save_pretrained(model, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 10
    assert "num_classes" not in config.get("model_args", {})
    assert config["quantization_config"] == ADQConfig(weight_bits=2).to_dict()


def saved(tmp_path):
    model, _ = trained_model(ADQConfig(weight_bits=2))
    adq_hf.save_pretrained(model, str(tmp_path))
    return tmp_path


def test_bits_that_do_not_match_the_config(tmp_path):
    path = saved(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["weight_bits"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"stored as 2-bit .* expects 3-bit"):
        timm.create_model(f"local-dir:{path}")


def test_truncated_file(tmp_path):
    path = saved(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        timm.create_model(f"local-dir:{path}")


def test_pickle_file_is_refused(tmp_path):
    path = saved(tmp_path)
    torch.save({"x": torch.zeros(1)}, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="pickle"):
        timm.create_model(f"local-dir:{path}")


def test_float_checkpoint_is_not_an_adq_checkpoint(tmp_path):
    path = saved(tmp_path)
    save_file(timm.create_model("test_resnet", num_classes=10).state_dict(), str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="not an adq_hf quantized checkpoint"):
        timm.create_model(f"local-dir:{path}")


def test_unknown_quant_method_and_unquantized_save(tmp_path):
    path = saved(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "gptq"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quant_method='gptq'"):
        timm.create_model(f"local-dir:{path}")
    with pytest.raises(ValueError, match="quantized by adq_hf"):
        adq_hf.save_pretrained(timm.create_model("test_resnet"), str(tmp_path / "float"))


def test_plain_timm_refuses_the_packed_checkpoint(tmp_path):
    """Without adq_hf's create_model, timm must not silently build a float model from it."""
    from adq_hf.integrations.timm import _timm_create_model

    path = saved(tmp_path)
    with pytest.raises(RuntimeError, match="weight_codes|Missing key"):
        _timm_create_model(f"local-dir:{path}", pretrained=True)
