import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from torch import nn

import adq_hf
from adq_hf import ADQConfig, quantize_model
from adq_hf.nn import QuantizedLayerMixin
from adq_hf.quantizers.codebook import initial_codebook

TEST_MODELS = ["test_resnet", "test_convnext", "test_efficientnet", "test_vit", "test_byobnet"]


def float_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@pytest.mark.parametrize("name", TEST_MODELS)
def test_timm_test_models_are_fully_swapped_and_train(name):
    model = timm.create_model(name, pretrained=False, num_classes=10,
                              quantization_config=ADQConfig(weight_bits=3, activation_bits=4))
    layers = float_layers(model)
    assert layers and all(isinstance(m, QuantizedLayerMixin) for _, m in layers)
    bits = adq_hf.bit_map(model)
    classifier = [n for n, m in layers if m is model.get_classifier()][0]
    first = next(n for n, m in layers if isinstance(m, nn.Conv2d))
    assert bits[classifier]["weight_bits"] == 8 and bits[first]["weight_bits"] == 8
    assert {b["weight_bits"] for n, b in bits.items() if n not in (classifier, first)} == {3}
    assert {b["activation_bits"] for n, b in bits.items() if n not in (classifier, first)} == {4}
    size = model.pretrained_cfg["input_size"][1:]
    x = torch.randn(2, 3, *size)
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(m.latent_weight().grad is not None for _, m in layers)


def test_layer_bits_regex_not_convert_and_float_edges():
    model = timm.create_model("test_resnet", num_classes=10)
    names = [n for n, _ in float_layers(model)]
    config = ADQConfig(weight_bits=4, layer_bits={r"layer1\..*conv.*": 2}, modules_to_not_convert=["layer2"],
                       first_layer_bits=None, last_layer_bits=None)
    quantize_model(model, config)
    bits = adq_hf.bit_map(model)
    assert all(not n.startswith("layer2") for n in bits)
    assert "fc" not in bits and names[0] not in bits
    assert {b["weight_bits"] for n, b in bits.items() if n.startswith("layer1") and "conv" in n} == {2}
    assert {b["weight_bits"] for n, b in bits.items() if n.startswith("layer3")} == {4}
    assert bits and all(b["activation_bits"] is None for b in bits.values())  # weight-only by default


def test_bad_layer_bits_and_models_without_layers_raise():
    with pytest.raises(ValueError, match=r"layer_bits entries \['nope.\*'\] match no"):
        quantize_model(timm.create_model("test_resnet"), ADQConfig(layer_bits={"nope.*": 2}))
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        quantize_model(nn.Sequential(nn.ReLU()), ADQConfig())
    with pytest.raises(TypeError, match="ADQConfig"):
        quantize_model(timm.create_model("test_resnet"), {"weight_bits": 2})


@pytest.mark.parametrize("cls", [Conv2dSame, StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame])
def test_forward_overriding_timm_convs_keep_their_math(cls):
    torch.manual_seed(0)
    layer = cls(4, 6, 3, stride=2)
    wrapper = nn.Sequential(nn.Conv2d(4, 4, 1), layer)  # the first conv takes the 8-bit default
    quantize_model(wrapper, ADQConfig(weight_bits=2, activation_bits=None))
    assert type(wrapper[1]).__name__ == f"Quant{cls.__name__}"
    x = torch.randn(2, 4, 9, 11)
    reference = cls(4, 6, 3, stride=2)
    reference.load_state_dict({k: v for k, v in layer.state_dict().items() if "quantizer" not in k}, strict=True)
    with torch.no_grad():
        reference.weight.copy_(layer.quantized_weight())
    assert torch.equal(layer(x), reference(x))


def test_unknown_forward_overriding_subclass_stays_float_with_warning():
    class Doubled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Conv2d(3, 3, 1), Doubled(3, 3, 1), nn.Linear(3, 3))
    with pytest.warns(UserWarning, match=r"1 \(Doubled: its forward is not known"):
        quantize_model(model, ADQConfig())
    assert type(model[1]) is Doubled


def test_create_model_passes_kwargs_and_initialises_from_pretrained(tmp_path):
    source = timm.create_model("test_resnet", num_classes=7)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(path))
    model = timm.create_model("test_resnet", pretrained=True, num_classes=7, drop_rate=0.25,
                              pretrained_cfg_overlay=dict(file=str(path)),
                              quantization_config=ADQConfig(weight_bits=2))
    assert model.num_classes == 7 and model.drop_rate == 0.25
    layer = model.layer1[0].conv1
    assert torch.equal(layer.latent_weight(), source.layer1[0].conv1.weight)  # pretrained loaded first
    expected = initial_codebook(source.layer1[0].conv1.weight.reshape(1, -1), 2)
    assert torch.equal(layer.weight_quantizer.codebook, expected)
    explicit = adq_hf.create_model("test_resnet", num_classes=7, quantization_config=ADQConfig())
    assert isinstance(explicit.fc, QuantizedLayerMixin)
    plain = timm.create_model("test_resnet", num_classes=7)
    assert not any(isinstance(m, QuantizedLayerMixin) for m in plain.modules())


def test_average_weight_bits_is_parameter_weighted():
    model = nn.Sequential(nn.Linear(10, 10, bias=False), nn.Linear(10, 30, bias=False))
    quantize_model(model, ADQConfig(weight_bits=2, layer_bits={"1": 4}))
    assert adq_hf.average_weight_bits(model) == pytest.approx((100 * 2 + 300 * 4) / 400)
    model = nn.Sequential(nn.Linear(10, 10, bias=False), nn.Linear(10, 30, bias=False))
    quantize_model(model, ADQConfig(weight_bits=2, modules_to_not_convert=["1"]))
    assert adq_hf.average_weight_bits(model) == 2
    assert adq_hf.average_weight_bits(model, include_float=True) == pytest.approx((100 * 2 + 300 * 32) / 400)


def test_tied_weights_stay_float():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    model.add_module("extra", nn.Linear(4, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_model(model, ADQConfig())
    assert any("weight tied" in str(w.message) for w in caught)
    assert not isinstance(model[0], QuantizedLayerMixin) and isinstance(model.extra, QuantizedLayerMixin)
