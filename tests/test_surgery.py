"""quantize_model on real timm models: which layers, at which bits, exact math of timm's own convs,
and the timm integration (create_model with quantization_config)."""

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from torch import nn

import adq_hf
from adq_hf import ADQConfig, quantize_model
from adq_hf.nn import QuantizedLayerMixin
from adq_hf.quantizers import CodebookWeightQuantizer, N2UQActivationQuantizer
from adq_hf.quantizers.codebook import initial_codebook

TEST_MODELS = ["test_resnet", "test_convnext", "test_efficientnet", "test_vit", "test_byobnet"]


pytestmark = pytest.mark.usefixtures("one_thread")


def float_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def quantized(module):
    return isinstance(module, QuantizedLayerMixin)


def small_input(model, batch=2):
    size = model.pretrained_cfg["input_size"][1:] if model.pretrained_cfg.get("fixed_input_size") else (32, 32)
    return torch.randn(batch, 3, *size)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_timm_test_models_are_fully_swapped_and_train(name):
    torch.manual_seed(0)
    extra = {"img_size": 32} if name == "test_vit" else {}
    model = timm.create_model(name, pretrained=False, num_classes=10, **extra)
    layers = float_layers(model)
    classifier = [n for n, m in layers if m is model.get_classifier()][0]
    first = next(n for n, m in layers if isinstance(m, nn.Conv2d))
    quantize_model(model, ADQConfig(weight_bits=3, activation_bits=4))
    assert all(quantized(m) for _, m in float_layers(model))  # every Linear/Conv2d, timm subclasses too
    bits = adq_hf.bit_map(model)
    assert set(bits) == {n for n, _ in layers}
    assert bits[first]["weight_bits"] == 8 and bits[first]["activation_bits"] == 8
    assert bits[classifier]["weight_bits"] == 8 and bits[classifier]["activation_bits"] == 8
    body = [b for n, b in bits.items() if n not in (classifier, first)]
    assert body and {b["weight_bits"] for b in body} == {3} and {b["activation_bits"] for b in body} == {4}
    for _, m in float_layers(model):
        assert isinstance(m.weight_quantizer, CodebookWeightQuantizer)
        assert isinstance(m.input_quantizer, N2UQActivationQuantizer)
    model.train()
    x = small_input(model)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    for n, m in float_layers(model):  # (some are exactly zero: timm zero-initialises last BN gammas)
        assert m.latent_weight().grad is not None and m.input_quantizer.scale.grad is not None, n
    for n in (first, classifier):
        assert model.get_submodule(n).latent_weight().grad.abs().sum() > 0, n
    assert adq_hf.average_weight_bits(model) == pytest.approx(
        sum(b["weight_bits"] * b["params"] for b in bits.values()) / sum(b["params"] for b in bits.values())
    )


def test_layer_bits_regex_not_convert_and_float_edges():
    model = timm.create_model("test_resnet", num_classes=10)
    names = [n for n, _ in float_layers(model)]
    config = ADQConfig(weight_bits=4, layer_bits={r"layer1\..*conv.*": 2}, modules_to_not_convert=["layer2"],
                       first_layer_bits=None, last_layer_bits=None)
    quantize_model(model, config)
    bits = adq_hf.bit_map(model)
    assert not any(n.startswith("layer2") for n in bits)  # a name covers its children
    assert not any(quantized(m) for n, m in model.named_modules() if n.startswith("layer2"))
    assert "fc" not in bits and names[0] not in bits and not quantized(model.fc)  # None keeps them float
    assert {b["weight_bits"] for n, b in bits.items() if n.startswith("layer1")} == {2}
    assert {b["weight_bits"] for n, b in bits.items() if not n.startswith("layer1")} == {4}
    assert bits and all(b["activation_bits"] is None for b in bits.values())  # weight-only by default
    assert model.quantization_config is config


def test_layer_bits_override_first_and_last_and_regex_exclusion():
    model = timm.create_model("test_resnet", num_classes=10)
    config = ADQConfig(weight_bits=3, activation_bits=3, layer_bits={"fc": 5, r"conv1\.0": 6},
                       modules_to_not_convert=[r"layer\d\.0\.downsample\..*"])
    quantize_model(model, config)
    bits = adq_hf.bit_map(model)
    # an explicit entry beats the first/last default, and the layer gets the body activation bits
    assert bits["fc"] == {"weight_bits": 5, "activation_bits": 3, "params": 960}
    assert bits["conv1.0"]["weight_bits"] == 6 and bits["conv1.0"]["activation_bits"] == 3
    assert not any("downsample" in n for n in bits) and quantized(model.layer2[0].conv1)
    assert bits["conv1.3"]["weight_bits"] == 3


def test_per_channel_quantizers_are_per_output_channel():
    model = timm.create_model("test_resnet", num_classes=10)
    quantize_model(model, ADQConfig(weight_bits=2, granularity="per_channel"))
    layer = model.layer1[0].conv1
    w = layer.latent_weight().detach()
    assert torch.equal(layer.weight_quantizer.codebook, initial_codebook(w.reshape(w.shape[0], -1), 2, iters=30))


def test_bad_layer_bits_and_models_without_layers_raise():
    with pytest.raises(ValueError) as err:
        quantize_model(timm.create_model("test_resnet"), ADQConfig(layer_bits={"fc": 4, r"nope\..*": 2}))
    message = str(err.value)
    assert r"layer_bits entries ['nope\\..*'] match no quantizable layer of ResNet" in message
    assert "conv1.0" in message  # shows what names look like
    with pytest.raises(ValueError, match="Sequential has no layer to quantize"):
        quantize_model(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)), ADQConfig())
    with pytest.raises(ValueError, match="selects no layer"):
        quantize_model(nn.Sequential(nn.Linear(2, 2)), ADQConfig(modules_to_not_convert=["0"]))
    with pytest.raises(TypeError, match="ADQConfig"):
        quantize_model(timm.create_model("test_resnet"), {"weight_bits": 2})


def _randomise(layer):
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 else 0.0))


@pytest.mark.parametrize("activation_bits", [None, 4])
@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (Conv2dSame, {}),
        (StdConv2d, {"padding": 1}),
        (StdConv2dSame, {}),
        (ScaledStdConv2d, {"padding": 1, "gamma": 1.7}),
        (ScaledStdConv2dSame, {"gamma": 1.7}),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_forward_overriding_timm_convs_keep_their_math(cls, kwargs, activation_bits):
    torch.manual_seed(0)
    layer = cls(4, 6, 3, stride=2, **kwargs)
    _randomise(layer)
    original = {k: v.clone() for k, v in layer.state_dict().items()}
    wrapper = nn.Sequential(nn.Conv2d(4, 4, 1), layer)  # the first conv takes the 8-bit default
    quantize_model(wrapper, ADQConfig(weight_bits=2, activation_bits=activation_bits))
    assert type(layer).__name__ == f"Quant{cls.__name__}" and isinstance(layer, cls) and quantized(layer)
    assert adq_hf.bit_map(wrapper)["1"]["weight_bits"] == 2
    x = torch.randn(2, 4, 9, 11)  # odd sizes: "SAME" padding is asymmetric
    layer.eval()
    out = layer(x)
    reference = cls(4, 6, 3, stride=2, **kwargs).eval()
    reference.load_state_dict(original)
    with torch.no_grad():
        qw = layer.quantized_weight()
        assert qw.unique().numel() <= 4 and not torch.equal(qw, original["weight"])
        reference.weight.copy_(qw)
        if hasattr(layer, "gain"):  # standardising the latent weight folds its scale into the gain
            reference.gain.copy_(layer.gain)
    inp = x if activation_bits is None else layer.input_quantizer(x)
    assert torch.equal(out, reference(inp))
    layer.train()
    layer(x).sum().backward()
    assert layer.latent_weight().grad.abs().sum() > 0


def test_unknown_forward_overriding_subclass_stays_float_with_warning():
    class Doubled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Conv2d(3, 3, 1), Doubled(3, 3, 1), nn.Linear(3, 3))
    with pytest.warns(UserWarning, match=r"leaves these layers in float: 1 \(Doubled: its forward is not known"):
        quantize_model(model, ADQConfig())
    assert type(model[1]) is Doubled and quantized(model[0]) and quantized(model[2])


def test_tied_weights_are_quantized_once_or_stay_float_together():
    """A weight two layers share is quantized once (the owner holds codes and quantizer state, the tied
    layer computes with the same quantized weight), at the highest bits either layer gets; when one of
    them stays float, both do, and the warning names them."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    model.add_module("extra", nn.Linear(4, 2))
    quantize_model(model, ADQConfig(weight_bits=3, layer_bits={"1": 5}))
    assert quantized(model[0]) and quantized(model[1]) and quantized(model.extra)
    assert model[1].tied_to is model[0] and model[1].weight_quantizer is model[0].weight_quantizer
    assert model[1].latent_weight() is model[0].latent_weight() and model[0].weight_bits == 5  # the higher bits
    assert set(adq_hf.bit_map(model)) == {"0", "extra"}  # the shared weight counts once
    assert not any(k.startswith("1.weight_quantizer") for k in model.state_dict())  # stored once
    assert torch.equal(model[1].quantized_weight(), model[0].quantized_weight())

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    model.add_module("extra", nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"1 \(weight tied to 0, which stays float\)"):
        quantize_model(model, ADQConfig(modules_to_not_convert=["0"]))
    assert not quantized(model[0]) and not quantized(model[1]) and quantized(model.extra)


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    source = timm.create_model("test_resnet", num_classes=7)
    with torch.no_grad():
        for p in source.parameters():
            p.copy_(torch.randn_like(p))
    path = tmp_path_factory.mktemp("float") / "weights.safetensors"
    save_file(source.state_dict(), str(path))
    return source, path


@pytest.mark.parametrize("entry", ["timm", "adq_hf"])
def test_create_model_passes_kwargs_and_initialises_from_pretrained(float_checkpoint, entry):
    source, path = float_checkpoint
    create = timm.create_model if entry == "timm" else adq_hf.create_model
    config = ADQConfig(weight_bits=2, granularity="per_channel")
    model = create("test_resnet", pretrained=True, num_classes=7, drop_rate=0.25,
                   pretrained_cfg_overlay=dict(file=str(path), num_classes=7),  # (else timm drops the classifier)
                   quantization_config=config)
    assert model.num_classes == 7 and model.drop_rate == 0.25 and model.fc.out_features == 7
    assert model.quantization_config is config
    for name in ("layer1.0.conv1", "fc", "conv1.0"):
        layer, weight = model.get_submodule(name), source.get_submodule(name).weight
        assert quantized(layer)
        assert torch.equal(layer.latent_weight(), weight)  # pretrained weights loaded first ...
        expected = initial_codebook(weight.reshape(weight.shape[0], -1), layer.weight_bits, iters=30)
        assert torch.equal(layer.weight_quantizer.codebook, expected)  # ... then the codebooks from them
    assert model.layer1[0].conv1.weight_bits == 2 and model.fc.weight_bits == 8


def test_create_model_without_config_is_plain_timm():
    plain = timm.create_model("test_resnet", num_classes=7, drop_rate=0.1)
    assert not any(quantized(m) for m in plain.modules()) and plain.drop_rate == 0.1
    from_dict = adq_hf.create_model("test_resnet", num_classes=3, quantization_config={"weight_bits": 3})
    assert quantized(from_dict.fc) and from_dict.quantization_config == ADQConfig(weight_bits=3)
    with pytest.raises(TypeError, match="quantization_config must be an adq_hf.ADQConfig or a dict"):
        timm.create_model("test_resnet", quantization_config=3)
    with pytest.raises(ValueError, match="ADQConfig.weight_bits=1"):
        timm.create_model("test_resnet", quantization_config={"weight_bits": 1})


def test_average_weight_bits_is_parameter_weighted():
    model = nn.Sequential(nn.Linear(10, 10, bias=False), nn.Linear(10, 30, bias=False))
    quantize_model(model, ADQConfig(weight_bits=2, layer_bits={"1": 4}))
    assert adq_hf.average_weight_bits(model) == pytest.approx((100 * 2 + 300 * 4) / 400)
    model = nn.Sequential(nn.Linear(10, 10, bias=False), nn.Linear(10, 30, bias=False))
    quantize_model(model, ADQConfig(weight_bits=2, modules_to_not_convert=["1"]))
    assert adq_hf.average_weight_bits(model) == 2
    assert adq_hf.average_weight_bits(model, include_float=True) == pytest.approx((100 * 2 + 300 * 32) / 400)
    assert adq_hf.average_weight_bits(nn.Sequential(nn.Linear(2, 2))) == 0  # nothing quantized
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Linear(8, 2))  # 216, 64, 16 weights
    quantize_model(conv, ADQConfig(weight_bits=3))  # first conv 8; a bare Sequential has no named classifier
    bits = adq_hf.bit_map(conv)
    total = sum(b["params"] for b in bits.values())
    assert adq_hf.average_weight_bits(conv) == pytest.approx(
        sum(b["params"] * b["weight_bits"] for b in bits.values()) / total
    )
    assert bits["0"]["weight_bits"] == 8 and bits["1"]["weight_bits"] == 3 and bits["2"]["weight_bits"] == 3
    assert adq_hf.average_weight_bits(conv) == pytest.approx((216 * 8 + 64 * 3 + 16 * 3) / 296)


def test_quantized_timm_linear_does_not_replace_quant_linear():
    """timm.layers.Linear shares nn.Linear's name: its quantized class must not take QuantLinear's."""
    import pickle

    from timm.layers import Linear as TimmLinear

    from adq_hf import nn as qnn

    plain = qnn.QuantLinear
    cls = qnn.quantized_class_for(TimmLinear)
    assert cls is not plain and qnn.QuantLinear is plain and issubclass(cls, TimmLinear)
    assert qnn.quantized_class_for(torch.nn.Linear) is plain and getattr(qnn, cls.__name__) is cls
    assert pickle.loads(pickle.dumps(cls)) is cls


def _effective_weight(layer, weight):
    """The weight a weight-standardising conv convolves with, for a given raw weight (timm's formula)."""
    return torch.nn.functional.batch_norm(weight.reshape(1, weight.shape[0], -1), None, None, training=True,
                                          momentum=0.0, eps=layer.eps).reshape_as(weight)


@pytest.mark.parametrize("cls, kwargs", [(StdConv2d, {"eps": 1e-8}), (ScaledStdConv2d, {"gamma": 1.7})],
                         ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_weight_standardising_convs_quantize_the_standardised_weight(cls, kwargs):
    """Trained StdConv weights carry per-channel scales (and offsets) the conv ignores: the quantizer must
    see the standardised weight, so its error is that of a unit-variance weight (docs/methods.md)."""
    torch.manual_seed(0)
    layer = cls(16, 32, 3, padding=1, **kwargs)
    with torch.no_grad():  # per-channel scale spread and offsets, as training leaves them; the float conv ignores both
        layer.weight.normal_(0, 0.05).mul_(torch.exp(0.5 * torch.randn(32, 1, 1, 1))).add_(0.02 * torch.randn(32, 1, 1, 1))
    raw = layer.weight.detach().clone()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        float_out = layer(x)
    model = nn.Sequential(nn.Conv2d(16, 16, 1), layer)
    quantize_model(model, ADQConfig(weight_bits=3, first_layer_bits=None))
    latent = layer.latent_weight().detach().reshape(32, -1)
    assert latent.mean(1).abs().max() < 1e-5 and (latent.var(1, unbiased=False) - 1).abs().max() < 1e-4
    with torch.no_grad():  # the float function is kept: the latent weight through the float conv's math
        float_again = torch.nn.functional.conv2d(
            x, _effective_weight(layer, layer.latent_weight()) * (layer.gain * layer.scale if hasattr(layer, "gain") else 1),
            layer.bias, layer.stride, layer.padding)
    assert (float_again - float_out).norm() / float_out.norm() < 1e-5
    target = _effective_weight(layer, raw)
    ours = _effective_weight(layer, layer.quantized_weight().detach())
    raw_quantizer = CodebookWeightQuantizer(3)
    raw_quantizer.init_from(raw)
    from_raw = _effective_weight(layer, raw_quantizer(raw).detach())
    error = (ours - target).norm() / target.norm()
    assert error < 0.8 * (from_raw - target).norm() / target.norm()


def test_layers_whose_parent_reads_their_weight_are_quantized_through_it():
    """timm's EVA attention runs ``F.linear(x, self.qkv.weight, qkv_bias)``: the qkv layer's forward never
    runs, so its weight must read as the quantized one (else fake-quant used the float weight while a
    checkpoint and deploy mode used the codes); its input cannot be quantized, and the warning says so."""
    torch.manual_seed(0)
    kwargs = dict(pretrained=False, num_classes=5, img_size=28, depth=2)
    model = timm.create_model("eva02_tiny_patch14_224", quantization_config=ADQConfig(weight_bits=3), **kwargs).eval()
    qkv = [n for n, _ in adq_hf.quantized_layers(model) if n.endswith("attn.qkv")]
    assert len(qkv) == 2
    ran = set()
    for name, layer in adq_hf.quantized_layers(model):
        layer.weight_quantizer.register_forward_hook(lambda *_, name=name: ran.add(name))
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        out = model(x)
    assert ran == {n for n, _ in adq_hf.quantized_layers(model)}  # every quantized weight is used
    deployed = adq_hf.convert_for_inference(__import__("copy").deepcopy(model), exact=True)  # bit for bit
    with torch.no_grad():
        assert torch.equal(deployed(x), out)
    with pytest.warns(UserWarning, match=r"quantizes only the weights of these layers.*blocks\.0\.attn\.qkv, blocks\.1\.attn\.qkv"):
        with_inputs = timm.create_model("eva02_tiny_patch14_224", quantization_config=ADQConfig(
            weight_bits=4, activation_bits=8), **kwargs)
    bits = adq_hf.bit_map(with_inputs)
    assert all(bits[n]["activation_bits"] is None for n in qkv)
    assert bits["blocks.0.attn.proj"]["activation_bits"] == 8
