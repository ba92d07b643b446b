"""The layer types beyond Linear/Conv2d (issue 16): transformers' Conv1D (GPT-2's transposed Linear),
nn.Conv1d (audio front-ends), nn.Linear subclasses with their own forward (Falcon), nn.Embedding (and
its subclasses), and weights tied between layers; through quantize_model, deploy, the packed
checkpoint, PTQ and mixed precision."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.falcon.modeling_falcon import FalconLinear
from transformers.models.gemma.modeling_gemma import GemmaTextScaledWordEmbedding
from transformers.models.whisper.modeling_whisper import WhisperPositionalEmbedding
from transformers.pytorch_utils import Conv1D

import adq_hf
from adq_hf import ADQConfig, quantize_model
from adq_hf.deploy import decode
from adq_hf.deploy.decode import lut_decode
from adq_hf.mixed_precision import allocate_bits, weight_layers
from adq_hf.nn import QuantizedLayerMixin
from adq_hf.packing import pack_codes
from adq_hf.serialization import load_file, read_file, save_file

pytestmark = pytest.mark.usefixtures("one_thread")


def quantized(module):
    return isinstance(module, QuantizedLayerMixin)


class Wrapper(nn.Module):
    """A stand-in for a model: first/last layers are float so every layer under test is 'body'."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _randomise(module, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return module


def test_gpt2_conv1d_is_quantized_per_output_channel_with_its_own_math():
    layer = _randomise(Conv1D(6, 5))  # nf=6 outputs, nx=5 inputs: weight [5, 6]
    reference = Conv1D(6, 5)
    reference.load_state_dict(layer.state_dict())
    model = Wrapper(layer)
    quantize_model(model, ADQConfig(weight_bits=2, granularity="per_channel", activation_bits=8,
                                    last_layer_bits=None))
    assert quantized(layer) and isinstance(layer, Conv1D) and type(layer).__name__ == "QuantConv1D"
    book = layer.weight_quantizer.codebook
    assert book.shape == (6, 4)  # one codebook per OUTPUT channel (a column of the [in, out] weight)
    qw = layer.quantized_weight()
    assert qw.shape == (5, 6)
    for out in range(6):  # every column takes its values from its own codebook
        assert set(qw[:, out].tolist()) <= set(book[out].tolist())
    x = torch.randn(2, 3, 5)
    with torch.no_grad():
        reference.weight.copy_(qw)
    assert torch.allclose(layer(x), reference(layer.input_quantizer(x)), atol=1e-5)  # (a transposed view: other rounding)
    layer(x).sum().backward()
    assert layer.latent_weight().grad.abs().sum() > 0


def test_nn_conv1d_is_quantized_with_inputs_per_channel_axis_1():
    layer = _randomise(nn.Conv1d(4, 6, 3, padding=1, stride=2))
    model = nn.Sequential(nn.Conv1d(4, 4, 1), layer)  # the first Conv1d is the first layer (float here)
    quantize_model(model, ADQConfig(weight_bits=3, activation_bits=4, first_layer_bits=None,
                                    activation_quantizer="asq"))
    assert not quantized(model[0])
    assert type(layer).__name__ == "QuantConv1d" and layer.weight_bits == 3
    assert layer.input_quantizer.channel_dim == 1  # ASQ's adapter sees the channels of NCL inputs
    x = torch.randn(2, 4, 9)
    out = layer(x)
    expected = F.conv1d(layer.input_quantizer(x), layer.quantized_weight(), layer.bias, stride=2, padding=1)
    assert torch.equal(out, expected) and layer.quantized_weight().unique().numel() <= 8


def test_the_first_conv1d_gets_first_layer_bits():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Conv1d(4, 4, 3), nn.Flatten(), nn.Linear(8, 3))
    model.fc = model[3]
    quantize_model(model, ADQConfig(weight_bits=3))
    assert adq_hf.bit_map(model)["0"]["weight_bits"] == 8 and adq_hf.bit_map(model)["1"]["weight_bits"] == 3


def test_linear_subclasses_with_plain_math_are_quantized_others_stay_float():
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * F.linear(x, self.weight, self.bias)

    class NeedsInit(nn.Linear):  # reads an attribute its __init__ sets: the probe can't run it, so it stays float
        def __init__(self, *args, scale=1.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.scale = scale

        def forward(self, x):
            return F.linear(x, self.weight, self.bias) * self.scale

    model = nn.Sequential(FalconLinear(4, 4, bias=False), FalconLinear(4, 4), Doubled(4, 4), NeedsInit(4, 4),
                          nn.Linear(4, 4))
    reference = FalconLinear(4, 4)
    reference.load_state_dict(model[1].state_dict())
    with pytest.warns(UserWarning, match=r"2 \(Doubled: its forward is not known.*3 \(NeedsInit"):
        quantize_model(model, ADQConfig(weight_bits=2))
    assert type(model[0]).__name__ == "QuantFalconLinear" and quantized(model[1])
    assert not quantized(model[2]) and not quantized(model[3]) and quantized(model[4])
    x = torch.randn(3, 4)
    with torch.no_grad():
        reference.weight.copy_(model[1].quantized_weight())
    assert torch.allclose(model[1](x), reference(x), atol=1e-6)


def test_embeddings_are_quantized_only_with_embedding_bits():
    model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 8))
    quantize_model(model, ADQConfig(weight_bits=4))
    assert not quantized(model[0])  # float by default
    model = nn.Sequential(_randomise(nn.Embedding(50, 8, padding_idx=0)), nn.Linear(8, 8))
    quantize_model(model, ADQConfig(weight_bits=4, embedding_bits=3, activation_bits=8))
    emb = model[0]
    assert type(emb).__name__ == "QuantEmbedding" and emb.weight_bits == 3 and emb.input_quantizer is None
    assert isinstance(emb.weight, nn.Parameter)  # transformers' get_parameter / tying still find a Parameter
    ids = torch.tensor([[1, 2, 0, 49]])
    out = emb(ids)
    assert torch.equal(out, emb.quantized_weight()[ids]) and out.unique().numel() <= 8
    out.sum().backward()
    assert emb.latent_weight().grad[1].abs().sum() > 0 and emb.latent_weight().grad[3].abs().sum() == 0
    assert adq_hf.bit_map(model)["0"] == {"weight_bits": 3, "activation_bits": None, "params": 400}
    assert adq_hf.average_weight_bits(model) == pytest.approx((400 * 3 + 64 * 4) / 464)


@pytest.mark.parametrize("cls", [GemmaTextScaledWordEmbedding, WhisperPositionalEmbedding])
def test_embedding_subclasses_run_their_own_forward_on_the_quantized_weight(cls):
    """Gemma scales super().forward(); Whisper indexes self.weight directly: both see the quantized table."""
    layer = cls(20, 6, 0, 2.5) if cls is GemmaTextScaledWordEmbedding else cls(20, 6)
    _randomise(layer)
    reference = cls(20, 6, 0, 2.5) if cls is GemmaTextScaledWordEmbedding else cls(20, 6)
    model = nn.Sequential(layer, nn.Linear(6, 6))
    quantize_model(model, ADQConfig(embedding_bits=2))
    assert quantized(layer) and isinstance(layer, cls)
    with torch.no_grad():
        reference.weight.copy_(layer.quantized_weight())
    ids = torch.tensor([[3, 5, 7]])
    assert torch.equal(layer(ids), reference(ids)) and layer(ids).unique().numel() <= 4


def test_embedding_with_max_norm_stays_float():
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Linear(4, 4))
    with pytest.warns(UserWarning, match="max_norm"):
        quantize_model(model, ADQConfig(embedding_bits=4))
    assert not quantized(model[0])


class TinyLM(nn.Module):
    """Embedding -> Conv1D -> Conv1d -> LM head tied to the embedding."""

    def __init__(self, vocab=40, dim=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = Conv1D(dim, dim)
        self.conv = nn.Conv1d(dim, dim, 3, padding=1)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def get_output_embeddings(self):
        return self.head

    def forward(self, ids):
        h = self.proj(self.embed(ids))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(torch.relu(h))


def _tiny_lm(config):
    torch.manual_seed(0)
    model = _randomise(TinyLM())
    quantize_model(model, config)
    return model


def test_tied_lm_head_follows_the_embedding():
    with pytest.warns(UserWarning, match=r"head \(weight tied to embed, which stays float; set ADQConfig.embedding_bits"):
        model = _tiny_lm(ADQConfig(weight_bits=4))
    assert not quantized(model.embed) and not quantized(model.head) and quantized(model.proj)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = _tiny_lm(ADQConfig(weight_bits=4, embedding_bits=3, activation_bits=8))
    assert model.head.tied_to is model.embed and model.embed.weight_bits == 8  # the head's last_layer_bits: the higher
    assert model.head.input_quantizer.bits == 8 and model.embed.input_quantizer is None
    assert set(adq_hf.bit_map(model)) == {"embed", "proj", "conv"}
    ids = torch.randint(0, 40, (2, 5))
    model(ids).sum().backward()  # one gradient for the shared latent weight, from both uses
    assert model.embed.latent_weight().grad is not None
    state = model.state_dict()
    assert "head.weight" in state and not any(k.startswith("head.weight_quantizer") for k in state)
    with pytest.warns(UserWarning, match=r"embed \(weight tied to head, which stays float\)"):
        model = _tiny_lm(ADQConfig(weight_bits=4, embedding_bits=3, last_layer_bits=None))
    assert not quantized(model.embed) and not quantized(model.head)  # the head stays float: so does its weight


@pytest.mark.parametrize("options", [
    dict(weight_bits=3, embedding_bits=4, activation_bits=8),
    dict(weight_bits=2, embedding_bits=3, granularity="per_channel", weight_quantizer="lsq"),
    dict(weight_bits=4, embedding_bits=5, weight_quantizer="post", last_layer_bits=6),
], ids=["adq-a8", "lsq-per-channel", "post"])
def test_new_layer_types_save_reload_and_deploy_exactly(options, tmp_path):
    config = ADQConfig(**options)
    model = _tiny_lm(config).eval()
    ids = torch.randint(0, 40, (3, 6))
    with torch.no_grad():
        expected = model(ids)
    save_file(model, str(tmp_path / "model.safetensors"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "head.weight" not in keys and keys >= {"embed.weight", "proj.weight", "conv.weight"}  # stored once
    torch.manual_seed(1)
    fresh = TinyLM()
    quantize_model(fresh, config)
    load_file(fresh, str(tmp_path / "model.safetensors"))
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(ids), expected)
    adq_hf.convert_for_inference(fresh)
    assert type(fresh.embed).__name__ == "DeployedEmbedding" and type(fresh.proj).__name__ == "DeployedConv1D"
    assert "weight" not in fresh.head._buffers and "weight" not in fresh.head._parameters  # the embedding's codes
    with torch.no_grad():
        assert torch.equal(fresh(ids), expected)
    save_file(fresh, str(tmp_path / "deployed.safetensors"))  # a deployed model writes the same checkpoint
    files = [read_file(str(tmp_path / name)) for name in ("model.safetensors", "deployed.safetensors")]
    assert files[0][1] == files[1][1] and files[0][0].keys() == files[1][0].keys()
    assert all(torch.equal(files[0][0][k], files[1][0][k]) for k in files[0][0])


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("groups", ["one", "per_row"])
def test_embedding_rows_decode_like_the_whole_table(bits, groups):
    generator = torch.Generator().manual_seed(bits)
    shape = (13, 7)  # 7 * bits is not a multiple of 8 for odd bits: rows start inside a byte
    codes = torch.randint(0, 2**bits, shape, generator=generator)
    table = torch.randn(1 if groups == "one" else 13, 2**bits, generator=generator)
    packed = pack_codes(codes, bits)
    full = lut_decode(packed, table, bits, shape)
    index = torch.tensor([[12, 0, 5], [5, 12, 1]])
    assert torch.equal(decode.lut_decode_rows(packed, table, bits, shape, index), full[index])


def test_deployed_embedding_decodes_only_the_rows_it_looks_up(monkeypatch):
    model = nn.Sequential(_randomise(nn.Embedding(1000, 16)), nn.Linear(16, 4))
    quantize_model(model, ADQConfig(embedding_bits=4))
    ids = torch.tensor([[3, 999, 3]])
    expected = model(ids).detach()
    adq_hf.convert_for_inference(model, exact=True)  # bit for bit (no fused matmul in the Linear)

    from adq_hf.deploy import layers as deploy_layers

    decoded_shapes, looked_up = [], []

    def spy(packed, table, bits, shape):
        decoded_shapes.append(tuple(shape))
        return lut_decode(packed, table, bits, shape)

    def rows_spy(packed, table, bits, shape, index):
        looked_up.append(tuple(index.shape))
        return decode.lut_decode_rows(packed, table, bits, shape, index)

    monkeypatch.setattr(deploy_layers, "lut_decode", spy)
    monkeypatch.setattr(deploy_layers, "lut_decode_rows", rows_spy)
    monkeypatch.setattr(deploy_layers.DeployedLayerMixin, "lut_plan", lambda self: None)  # the PyTorch decode path
    with torch.no_grad():
        assert torch.equal(model(ids), expected)
    assert looked_up == [(1, 3)]
    assert decoded_shapes == [(4, 16)]  # the Linear's weight only, never the [1000, 16] table


def test_onnx_export_of_the_new_layer_types(tmp_path):
    pytest.importorskip("onnxruntime")
    model = _tiny_lm(ADQConfig(weight_bits=4, embedding_bits=4)).eval()
    ids = torch.randint(0, 40, (1, 6))
    result = adq_hf.export_onnx(model, ids, str(tmp_path / "tiny.onnx"))
    assert result["rel_l2"] <= 1e-5


def test_ptq_on_conv1d_layers_and_a_tied_head():
    """GPTQ on transformers' Conv1D and nn.Conv1d uses their output-major rows; the tied head is solved with
    its own inputs (the embedding is only looked up: its forward rounds to nearest)."""
    from adq_hf import ptq

    torch.manual_seed(0)
    batches = [torch.randint(0, 40, (4, 6)) for _ in range(4)]
    model = _randomise(TinyLM()).eval()
    config = ADQConfig(weight_bits=2, embedding_bits=3, last_layer_bits=3, granularity="per_channel")
    ptq.quantize(model, batches, config, method="gptq", progress=False)
    report = model.ptq_report
    assert set(report) == {"proj", "conv", "head"}
    for name in report:
        assert report[name]["error"] <= report[name]["rtn_error"] + 1e-9, name
    assert report["proj"]["error"] < report["proj"]["rtn_error"] and report["head"]["error"] < report["head"]["rtn_error"]
    for layer in (model.proj, model.conv, model.embed):  # every weight on its own levels
        rows = adq_hf.nn.output_major(layer, layer.latent_weight())
        assert torch.equal(layer.weight_quantizer.decode(layer.weight_quantizer.encode(rows)), rows)


def test_sensitivity_layers_and_allocation_see_the_new_types():
    torch.manual_seed(0)
    model = _randomise(TinyLM())
    layers = weight_layers(model)
    assert list(layers) == ["embed", "proj", "conv"]  # the tied head's weight is the embedding's: once
    config = ADQConfig(granularity="per_channel")
    sensitivity = {"proj": 1.0, "conv": 1.0}
    bits = allocate_bits(model, sensitivity, target_avg_bits=3.0, candidates=(2, 4), config=config)
    assert set(bits) == {"proj", "conv"}
    # the candidate error of a Conv1D comes from codebooks per output channel (the columns)
    from adq_hf.mixed_precision import quantization_error
    from adq_hf.quantizers import make_weight_quantizer

    rows = model.proj.weight.detach().t()
    quantizer = make_weight_quantizer(config, 2, rows.shape)
    quantizer.init_from(rows)
    direct = float((rows.double() - quantizer(rows).double()).pow(2).sum())
    via_allocation = quantization_error(adq_hf.mixed_precision.allocation.output_major_weights(model)["proj"], 2, config)
    assert via_allocation == pytest.approx(direct)
