"""ASQ activations and POST weights (arXiv 2504.17263): the documented level set, bit-exact LUT
decoding, gradients, the per-sample / per-token step multiplier, checkpoints (timm and transformers)
and mixed precision. Choices: docs/methods.md."""

import math

import pytest
import timm
import torch

import adq_hf
from adq_hf import ADQConfig, quantize_model
from adq_hf.mixed_precision import candidate_stats, weight_layers
from adq_hf.quantizers import (
    ASQActivationQuantizer,
    LSQActivationQuantizer,
    POSTWeightQuantizer,
    make_activation_quantizer,
    make_weight_quantizer,
)
from adq_hf.quantizers.asq import BETA_MAX, BETA_MIN
from adq_hf.quantizers.post import post_levels
from adq_hf.serialization import load_file, save_file

pytestmark = pytest.mark.usefixtures("one_thread")

R = 2**-0.5
DOCUMENTED_LEVELS = {  # docs/methods.md: zero, 2**(b-1) negative and 2**(b-1) - 1 positive powers of sqrt(2)
    2: [-1, -R, 0, 1],
    3: [-1, -R, -0.5, -R / 2, 0, 0.5, R, 1],
    4: [-(R**k) for k in range(8)] + [0] + [R**k for k in range(6, -1, -1)],
}
POST_ASQ = dict(weight_quantizer="post", activation_quantizer="asq")


def resnet20(config=None, seed=0):
    torch.manual_seed(seed)
    return timm.create_model("resnet20_cifar", num_classes=10, in_chans=1, quantization_config=config)


def train_steps(model, x, steps=2, lr=0.05):
    """Move weights, alphas, steps and adapters away from their initial values."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        model(x).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


# ---------------------------------------------------------------- POST weights
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_post_level_set_is_the_documented_one(bits):
    levels = post_levels(bits)
    assert levels.tolist() == pytest.approx(sorted(DOCUMENTED_LEVELS[bits]), abs=1e-15)
    assert levels.unique().numel() == levels.numel() == 2**bits  # the reference code has 2**b + 1
    assert (levels == 0).sum() == 1 and levels.abs().max() == 1
    for side in (levels[levels > 0], -levels[levels < 0]):
        ratios = side.sort(descending=True).values
        assert torch.allclose(ratios[:-1] / ratios[1:], torch.full((side.numel() - 1,), math.sqrt(2), dtype=torch.float64))
    # the LUT is alpha times the set, one row per output channel
    w = torch.randn(6, 4, 3, 3)
    q = make_weight_quantizer(ADQConfig(weight_quantizer="post"), bits, w.shape)
    q.init_from(w)
    assert q.levels().shape == (6, 2**bits)
    assert torch.allclose(q.levels(), q.alpha.detach() * levels.float())


def test_post_alpha_starts_at_the_99th_percentile_of_each_channel():
    w = torch.randn(5, 3, 3, 3)
    q = POSTWeightQuantizer(3, out_channels=5)
    q.init_from(w)
    assert torch.equal(q.alpha.detach(), torch.quantile(w.reshape(5, -1).abs(), 0.99, dim=1, keepdim=True))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_post_lut_decode_equals_forward_bit_exactly(bits):
    torch.manual_seed(bits)
    w = torch.randn(8, 4, 3, 3) * torch.logspace(-2, 0, 8).reshape(8, 1, 1, 1)
    q = POSTWeightQuantizer(bits, out_channels=8)
    q.init_from(w)
    with torch.no_grad():
        q.alpha.mul_(torch.rand_like(q.alpha) + 0.5)  # a trained alpha, not the initial quantile
    codes = q.encode(w)
    assert codes.shape == w.shape and codes.dtype == torch.int64 and 0 <= codes.min() and codes.max() < 2**bits
    quantized = q(w)
    assert torch.equal(q.decode(codes), quantized)
    assert torch.equal(quantized, torch.gather(q.levels(), 1, codes.reshape(8, -1)).reshape(w.shape))
    assert torch.equal(q(quantized), quantized)  # a weight on a level stays there (PTQ writes levels)
    # nearest level: no level of the row is closer than the chosen one
    rows, table = w.reshape(8, -1, 1), q.levels().unsqueeze(1)
    assert torch.all((rows - quantized.reshape(8, -1, 1)).abs() <= (rows - table).abs().min(dim=2, keepdim=True).values + 1e-7)


def test_post_gradients_reach_alpha_and_w():
    torch.manual_seed(0)
    w = torch.randn(3, 50, requires_grad=True)
    q = POSTWeightQuantizer(3, out_channels=3)
    q.init_from(w)
    grad_out = torch.randn(3, 50)
    (q(w) * grad_out).sum().backward()
    alpha = q.alpha.detach()
    inside = w.detach().abs() <= alpha
    assert 0 < (~inside).sum() and torch.allclose(w.grad, grad_out * inside)  # clipped straight-through
    assert torch.all(w.grad[~inside] == 0)
    m = q.decode(q.encode(w)) / alpha  # the normalised level of each weight
    expected = (grad_out * torch.where(inside, m - w.detach() / alpha, m)).sum(1, keepdim=True) / math.sqrt(50)
    assert torch.allclose(q.alpha.grad, expected, atol=1e-6) and q.alpha.grad.abs().min() > 0


def test_timm_post_asq_checkpoint_reproduces_outputs_exactly(tmp_path):
    config = ADQConfig(weight_bits=2, activation_bits=2, **POST_ASQ)
    model = resnet20(config)
    x = torch.randn(4, 1, 28, 28)
    model.train()(x)  # calibrate with the batch statistics it trains with (eval BN of a fresh net is not)
    train_steps(model, x)
    assert not any("adapter" in name for name in weight_layers(model))  # the adapter is no layer of the model
    layer = model.layer1[0].conv1
    assert layer.input_quantizer.adapter.out_weight.abs().sum() > 0  # trained: no longer the initial 0
    with torch.no_grad():
        expected = model(x)
    path = str(tmp_path / "model.safetensors")
    save_file(model, path)
    reloaded = resnet20(config, seed=1)  # other random weights: everything must come from the file
    load_file(reloaded, path)
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), expected)
    state = reloaded.state_dict()
    for key, value in model.state_dict().items():
        if key.endswith(("weight_quantizer.alpha", "input_quantizer.step")) or ".adapter." in key:
            assert torch.equal(state[key], value), key


# ---------------------------------------------------------------- ASQ activations
def test_asq_multiplier_is_exactly_one_at_initialisation_and_equals_lsq():
    torch.manual_seed(0)
    for channels, x in ((16, torch.randn(4, 16, 6, 6).relu()), (3, torch.randn(4, 3, 6, 6)), (32, torch.randn(2, 5, 32))):
        channel_dim = 1 if x.dim() == 4 else -1
        asq, lsq = ASQActivationQuantizer(2, channels, channel_dim), LSQActivationQuantizer(2)
        assert torch.equal(asq.multiplier(x), torch.ones_like(asq.multiplier(x)))
        assert torch.equal(asq(x), lsq(x))  # same first-batch step, beta = 1: ASQ starts as LSQ
        assert torch.equal(asq.step, lsq.step) and bool(asq.signed) == bool(x.min() < 0)
    assert ASQActivationQuantizer(2, 3, 1).adapter.hidden_weight is None  # C < 8: one Linear(C, 1)
    assert ASQActivationQuantizer(2, 16, 1).adapter.hidden_weight.shape == (4, 16)


def test_asq_gradients_reach_the_step_both_adapter_layers_and_the_input():
    torch.manual_seed(0)
    q = ASQActivationQuantizer(2, 16, channel_dim=1)
    x = (torch.randn(4, 16, 5, 5) * 2).relu().requires_grad_()
    q(x)  # first batch: initialise
    adapter = q.adapter
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    grad_out = torch.randn(4, 16, 5, 5)
    (q(x) * grad_out).sum().backward()
    assert q.step.grad.abs() > 0 and adapter.out_weight.grad.abs().sum() > 0 and adapter.out_bias.grad.abs() > 0
    # LSQ's step gradient with s * beta as the step (beta = 1 now): round(v) - v inside, the bound outside,
    # scaled by 1/sqrt(numel Qp) for s and by 1/sqrt(n Qp) for each beta (n = C H W elements per sample)
    s, (qmin, qmax), v = q.step.detach(), q.int_range(), x.detach() / q.step.detach()
    per_element = grad_out * torch.where((v > qmin) & (v < qmax), v.round() - v, v.clamp(qmin, qmax))
    assert torch.allclose(q.step.grad, per_element.sum() / math.sqrt(x.numel() * qmax), rtol=1e-4)
    assert torch.allclose(adapter.out_bias.grad, s * per_element.sum() / math.sqrt(16 * 5 * 5 * qmax), rtol=1e-4)
    # the last layer starts at zero, so the hidden layer gets its first gradient after one step
    assert adapter.hidden_weight.grad.abs().sum() == 0
    opt.step()
    opt.zero_grad()
    x.grad = None
    (q(x) * grad_out).sum().backward()
    assert adapter.hidden_weight.grad.abs().sum() > 0 and adapter.hidden_bias.grad.abs().sum() > 0
    # the input gets LSQ's straight-through gradient: 1 strictly inside the clipping range (torch.clamp's
    # gradient; the exact zeros after ReLU sit on the lower bound), 0 elsewhere
    scaled = x.detach() / (q.step.detach() * q.multiplier(x))
    qmin, qmax = q.int_range()
    inside = (scaled > qmin) & (scaled < qmax)
    assert 0 < (~inside).sum() and torch.allclose(x.grad, grad_out * inside) and torch.all(x.grad[~inside] == 0)


@pytest.mark.parametrize("quantizer", ["weight", "activation"])
def test_lsq_clips_before_rounding_so_values_rounding_to_a_bound_keep_their_gradient(quantizer):
    """ASQ inherits LSQ's forward: values in (qmax - 0.5, qmax) round to qmax but are inside the range."""
    if quantizer == "weight":
        q, qmin, qmax = make_weight_quantizer(ADQConfig(weight_quantizer="lsq"), 2, (1, 4)), -2, 1
    else:
        q, qmin, qmax = LSQActivationQuantizer(2), 0, 3
        q.initialized.fill_(True)
    x = torch.tensor([[0.7, 0.2, qmax - 0.2, qmax + 0.7]], requires_grad=True)  # step 1: v = x
    q(x).sum().backward()
    assert x.grad.tolist() == [[1.0, 1.0, 1.0, 0.0]]
    v = x.detach()
    expected = torch.where((v > qmin) & (v < qmax), v.round() - v, v.clamp(qmin, qmax)).sum() / math.sqrt(4 * qmax)
    assert torch.allclose(q.step.grad.sum(), expected)


def _perturbed_asq(channels, channel_dim, x):
    q = ASQActivationQuantizer(3, channels, channel_dim)
    q(x)
    with torch.no_grad():  # a trained adapter: beta differs from sample to sample
        q.adapter.out_weight.normal_(0, 0.5)
    return q


def _assert_on_grid(q, x, out):
    step = q.step.detach() * q.multiplier(x)
    k = out / step
    qmin, qmax = q.int_range()
    assert torch.allclose(k, k.round(), atol=1e-4) and k.round().min() >= qmin and k.round().max() <= qmax
    assert torch.equal(out, torch.clamp(torch.round(x / step), qmin, qmax) * step)  # exactly k * (s * beta)


def test_asq_outputs_lie_on_each_samples_grid():
    torch.manual_seed(0)
    x = torch.randn(6, 16, 5, 5).relu() * torch.logspace(-1, 1, 6).reshape(6, 1, 1, 1)
    q = _perturbed_asq(16, 1, x)
    beta = q.multiplier(x)
    assert beta.shape == (6, 1, 1, 1) and beta.unique().numel() == 6
    assert beta.min() >= BETA_MIN and beta.max() <= BETA_MAX
    with torch.no_grad():
        _assert_on_grid(q, x, q(x))


def test_asq_linear_variant_gives_one_multiplier_per_token():
    torch.manual_seed(0)
    tokens = torch.randn(2, 5, 32)
    q = _perturbed_asq(32, -1, tokens)
    beta = q.multiplier(tokens)
    assert beta.shape == (2, 5, 1) and beta.unique().numel() == 10
    with torch.no_grad():
        _assert_on_grid(q, tokens, q(tokens))
        # per token: a sequence is quantized the same with or without the other one (or padding)
        assert torch.equal(q(tokens[:1, :3]), q(tokens)[:1, :3])


def test_factory_passes_the_layer_channels_only_to_asq():
    config = ADQConfig(activation_bits=4, activation_quantizer="asq")
    q = make_activation_quantizer(config, 4, in_features=24, channel_dim=1)
    assert isinstance(q, ASQActivationQuantizer) and q.adapter.channels == 24 and q.channel_dim == 1
    with pytest.raises(ValueError, match="input channel count"):
        make_activation_quantizer(config, 4)
    assert isinstance(make_activation_quantizer(ADQConfig(activation_quantizer="lsq"), 4, 24, 1), LSQActivationQuantizer)
    model = quantize_model(resnet20(), ADQConfig(activation_bits=2, **POST_ASQ))
    assert model.layer2[0].conv1.input_quantizer.adapter.channels == 16  # conv in_channels
    assert model.fc.input_quantizer.channel_dim == -1 and model.fc.input_quantizer.adapter.channels == 64


def test_asq_built_on_meta_gets_its_initial_values_on_the_first_batch_but_keeps_loaded_state():
    reference = ASQActivationQuantizer(2, 16, channel_dim=1)
    with torch.device("meta"):
        q = ASQActivationQuantizer(2, 16, channel_dim=1)
    assert q.adapter.hidden_weight.is_meta
    # what transformers does with keys missing from a float checkpoint, then adq_hf's integration
    q = q.to_empty(device="cpu")
    torch.nn.init.normal_(q.adapter.out_weight)
    q.initialized.fill_(False)
    x = torch.randn(2, 16, 4, 4).relu()
    q(x)
    for (name, value), expected in zip(q.adapter.named_parameters(), reference.adapter.parameters()):
        assert torch.equal(value, expected), name
    # a calibrated, trained state (initialized=True) is never reset
    with torch.no_grad():
        q.adapter.hidden_weight.add_(1.0)
    trained = {k: v.clone() for k, v in q.state_dict().items()}
    loaded = ASQActivationQuantizer(2, 16, channel_dim=1)
    loaded.load_state_dict(trained)
    loaded(x)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained.items())


def test_adapter_overhead_on_resnet20():
    """The number reported in docs/methods.md: adapter parameters relative to the float model's."""
    model = quantize_model(resnet20(), ADQConfig(activation_bits=4, **POST_ASQ))
    adapter = sum(p.numel() for name, p in model.named_parameters() if ".adapter." in name)
    params = sum(p.numel() for name, p in model.named_parameters() if "_quantizer." not in name)
    assert (adapter, params) == (8839, 272186)
    assert adapter / params == pytest.approx(0.0325, abs=1e-4)


# ---------------------------------------------------------------- transformers and mixed precision
def test_minilm_quantized_on_load_with_post_asq_round_trips(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from adq_hf.data import minilm_path

    path = minilm_path()
    batch = AutoTokenizer.from_pretrained(path)(
        ["Quantized models are small and fast.", "A short one."], padding=True, return_tensors="pt"
    )
    config = ADQConfig(weight_bits=4, activation_bits=8, **POST_ASQ)
    model = AutoModel.from_pretrained(path, quantization_config=config)
    query = model.encoder.layer[0].attention.self.query
    assert isinstance(query.weight_quantizer, POSTWeightQuantizer) and isinstance(query.input_quantizer, ASQActivationQuantizer)
    fresh = ASQActivationQuantizer(8, 384, channel_dim=-1)
    model.eval()
    with torch.no_grad():
        model(**batch)  # the first batch initialises step and adapter (built on meta, allocated uninitialised)
    for value, expected in zip(query.input_quantizer.adapter.parameters(), fresh.adapter.parameters()):
        assert torch.equal(value, expected)
    assert torch.equal(query.weight_quantizer.alpha.detach(),
                       torch.quantile(query.latent_weight().detach().abs(), 0.99, dim=1, keepdim=True))
    model.train()
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if "_quantizer." in n], lr=0.1)
    model(**batch).last_hidden_state.pow(2).mean().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    trained_adapter = query.input_quantizer.adapter.out_weight.detach().clone()
    assert trained_adapter.abs().sum() > 0
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.quantization_config == config
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).last_hidden_state, expected)
    assert torch.equal(reloaded.encoder.layer[0].attention.self.query.input_quantizer.adapter.out_weight, trained_adapter)


def test_mixed_precision_allocation_with_post():
    weight = resnet20().layer2[0].conv1.weight
    config = ADQConfig(weight_quantizer="post")
    errors = [candidate_stats(weight, bits, config)[0] for bits in (2, 3, 4, 8)]
    assert all(math.isfinite(e) for e in errors) and errors[0] > errors[1] > errors[2] >= errors[3]
    assert candidate_stats(weight, 2, config)[1] == weight.shape[0] * 4  # the table: one float32 alpha per channel

    model = resnet20()
    calibration = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))]
    config = ADQConfig(target_avg_bits=3.0, activation_bits=4, **POST_ASQ)
    quantize_model(model, config, calibration_data=calibration)
    assert len(config.layer_bits) == 20 and set(config.layer_bits.values()) <= {2, 3, 4, 8}
    assert adq_hf.average_weight_bits(model) <= 3.0
    assert all(isinstance(layer.weight_quantizer, POSTWeightQuantizer) for _, layer in adq_hf.quantized_layers(model))
    with torch.no_grad():
        assert torch.isfinite(model.eval()(calibration[0][0])).all()
