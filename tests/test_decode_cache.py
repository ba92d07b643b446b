"""The eval-mode decoded-weight cache of fake-quant layers (``QuantizedLayerMixin.quantized_weight``):
each weight is encoded once per state, outputs stay bit-identical to the uncached path, and no
change of the weights or the quantizer state ever leaves a stale weight in use."""

import copy

import pytest
import timm
import torch

import adq_hf
from adq_hf import ADQConfig
from adq_hf.nn import decoded_weight_bytes, set_decode_cache  # noqa

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "adq_per_channel": ADQConfig(weight_bits=3, granularity="per_channel", codebook_init_iters=2),
    "adq_w2a2": ADQConfig(weight_bits=2, activation_bits=2, codebook_init_iters=2),
    "lsq": ADQConfig(weight_bits=3, weight_quantizer="lsq", activation_quantizer="lsq", activation_bits=4),
    "post": ADQConfig(weight_bits=3, weight_quantizer="post"),
}


def _resnet(config):
    torch.manual_seed(0)
    model = timm.create_model("resnet20_cifar", num_classes=10, in_chans=1)
    adq_hf.quantize_model(model, ADQConfig.from_dict(config.to_dict()), calibration_data=[torch.randn(4, 1, 28, 28)])
    return model.eval()


def _encode_counter(model):
    """Counts weight-quantizer forwards (each one encodes the whole weight)."""
    calls = []
    for _, layer in adq_hf.quantized_layers(model):
        layer.weight_quantizer.register_forward_hook(lambda *a: calls.append(1))
    return calls


def _uncached(model, x):
    reference = copy.deepcopy(model)
    set_decode_cache(reference, False)
    with torch.no_grad():
        return reference(x)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_eval_forward_encodes_each_weight_once_and_is_bit_identical(name):
    model = _resnet(CONFIGS[name])
    x = torch.randn(3, 1, 28, 28)
    expected = _uncached(model, x)
    calls = _encode_counter(model)
    layers = len(adq_hf.quantized_layers(model))
    with torch.no_grad():
        first = model(x)
        assert len(calls) == layers
        second = model(x)
    assert len(calls) == layers  # the second call decoded nothing
    assert torch.equal(first, expected) and torch.equal(second, expected)
    params = sum(layer.weight_numel for _, layer in adq_hf.quantized_layers(model))
    assert decoded_weight_bytes(model) == 4 * params
    # inference_mode and "nothing requires grad" count as no-graph forwards too
    with torch.inference_mode():
        assert torch.equal(model(x), expected)
    model.requires_grad_(False)
    assert torch.equal(model(x), expected)


def test_a_forward_that_needs_gradients_never_uses_the_cache():
    model = _resnet(CONFIGS["adq_per_channel"])
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        model(x)  # fills the cache
    calls = _encode_counter(model)
    out = model(x)  # eval mode, grad enabled, latent weights require grad
    assert len(calls) == len(adq_hf.quantized_layers(model))
    out.sum().backward()
    assert model.layer1[0].conv1.weight.grad is not None and model.layer1[0].conv1.weight.grad.abs().sum() > 0


def test_in_place_weight_changes_load_state_dict_and_dtype_moves_refresh_the_cache():
    model = _resnet(CONFIGS["adq_per_channel"])
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        model(x)
        model.layer2[0].conv1.weight.mul_(-1.5)  # in place on the parameter (its version counter moves)
        assert torch.equal(model(x), _uncached(model, x))
    other = _resnet(CONFIGS["adq_per_channel"])
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out, _uncached(other, x)) and not torch.equal(out, _uncached(_resnet(CONFIGS["adq_per_channel"]), x))
    model.double()
    with torch.no_grad():
        out = model(x.double())
    assert out.dtype == torch.float64 and torch.equal(out, _uncached(model, x.double()))


def test_quantizer_state_changes_refresh_the_cache():
    model = _resnet(CONFIGS["adq_per_channel"])
    lsq = _resnet(CONFIGS["lsq"])
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        model(x), lsq(x)
        model.layer1[1].conv2.weight_quantizer.codebook.mul_(0.5)
        lsq.layer3[0].conv1.weight_quantizer.step.mul_(2.0)
        lsq.layer3[0].conv1.weight_quantizer = copy.deepcopy(lsq.layer3[0].conv1.weight_quantizer)  # a new object
        lsq.layer3[0].conv1.weight_quantizer.step.mul_(0.5)
        assert torch.equal(model(x), _uncached(model, x)) and torch.equal(lsq(x), _uncached(lsq, x))


def test_training_drops_the_cache_and_eval_after_training_sees_the_new_weights():
    model = _resnet(CONFIGS["adq_w2a2"])
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    with torch.no_grad():
        before = model(x)
    assert decoded_weight_bytes(model) > 0
    model.train()
    assert decoded_weight_bytes(model) == 0  # the copies are freed when training resumes
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        model(x)  # train mode, no grad: nothing is cached in training mode
    assert decoded_weight_bytes(model) == 0
    model.eval()
    with torch.no_grad():
        after = model(x)
    assert not torch.equal(after, before) and torch.equal(after, _uncached(model, x))


def test_opt_out_frees_and_stops_caching():
    model = _resnet(CONFIGS["post"])
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        model(x)
    assert set_decode_cache(model, False) == len(adq_hf.quantized_layers(model))
    assert decoded_weight_bytes(model) == 0
    calls = _encode_counter(model)
    with torch.no_grad():
        model(x), model(x)
    assert len(calls) == 2 * len(adq_hf.quantized_layers(model)) and decoded_weight_bytes(model) == 0
    set_decode_cache(model, True)
    with torch.no_grad():
        model(x)
    assert decoded_weight_bytes(model) > 0


def test_transformers_model_generates_from_the_cache():
    """A causal LM quantized on load runs generate() (eval, no_grad) with one encode per layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    adq_hf.quantize_model(model, ADQConfig(weight_bits=4, granularity="per_channel", codebook_init_iters=2))
    reference = copy.deepcopy(model)
    set_decode_cache(reference, False)
    calls = _encode_counter(model)
    ids = torch.randint(0, 64, (1, 5))
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert len(calls) == len(adq_hf.quantized_layers(model))
    assert torch.equal(out, reference.generate(ids, max_new_tokens=6, do_sample=False))
