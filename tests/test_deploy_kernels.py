"""The optional C++ look-up-table kernels of deploy mode (adq_hf.deploy.kernels): the fused matmul against
the fake-quant layer (random and real MiniLM weights, every width, per-tensor / per-channel / per-group
tables), exact decoding and N2UQ counting, the layers' use of them, and the fallback without a build.

Tolerance of the fused matmul: it sums each output's K products in another order than the BLAS
``F.linear`` of the decoded weight (blocks, 8 lanes, several accumulators, FMA). Two fp32 summation
orders of ``sum_k w_k x_k (+ b)`` differ by at most ``2 * gamma_{K+1} * (sum_k |w_k x_k| + |b|)``,
``gamma_n = n u / (1 - n u)``, ``u = 2**-24`` (the standard bound for any order, Higham 2002, 3.1):
:func:`reassociation_bound`. The table values themselves are copied, never recomputed."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import adq_hf
from adq_hf import ADQConfig
from adq_hf.deploy import DeployedLayerMixin, convert_for_inference, kernels, lut_decode, set_exact
from adq_hf.packing import pack_codes

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not kernels.kernels_available(), reason="no C++ compiler: the kernels are optional")]

U = 2.0**-24


def reassociation_bound(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    n = x.shape[-1] + 1
    gamma = n * U / (1 - n * U)
    magnitude = x.double().abs() @ weight.double().abs().T
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
    return 2 * gamma * magnitude


def assert_reassociation_close(got, x, weight, bias=None):
    expected = F.linear(x, weight, bias)
    assert got.shape == expected.shape and got.dtype == torch.float32
    excess = (got.double() - expected.double()).abs() - reassociation_bound(x, weight, bias)
    assert (excess <= 0).all(), f"{float(excess.max())} over the reassociation bound"


def random_layer(bits, rows, cols, granularity, group_size=None, seed=0):
    """Packed codes, a table ``[groups, 2**bits]`` and the decoded weight (the PyTorch reference decoder)."""
    g = torch.Generator().manual_seed(seed)
    levels = 2**bits
    groups = {"per_tensor": 1, "per_channel": rows, "per_group": rows * (cols // (group_size or cols))}[granularity]
    table = torch.randn(groups, levels, generator=g)
    codes = torch.randint(0, levels, (rows, cols), generator=g)
    packed = pack_codes(codes, bits)
    return packed, table, lut_decode(packed, table, bits, (rows, cols))


# (rows, cols, group size for per_group): whole blocks, row tails (cols not a multiple of a block),
# rows not starting on a byte (scalar loop), groups of 32 and 64 columns and groups smaller than a block
SHAPES = [(37, 128, 64), (9, 200, 40), (5, 13, None), (16, 72, 8), (3, 1000, 200), (33, 96, 32), (12, 256, 128)]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_group"])
def test_fused_matmul_equals_the_decoded_linear_up_to_reassociation(bits, granularity):
    vectorized = 0
    for rows, cols, group_size in SHAPES:
        if granularity == "per_group" and group_size is None:
            continue
        packed, table, weight = random_layer(bits, rows, cols, granularity, group_size, seed=bits * 100 + rows)
        assert torch.equal(kernels.decode(packed, table, bits, rows, cols), weight)  # decoding is exact
        gs = cols if granularity != "per_group" else group_size
        vectorized += kernels.vectorized(bits, cols, gs)
        bias = torch.randn(rows)
        for m in (1, 2, 3, 4, 5, 12):
            x = torch.randn(m, cols) * 3
            got = kernels.lut_linear(x, packed, table, bits, rows, cols, bias)
            assert_reassociation_close(got, x, weight, bias)
        x = torch.randn(2, 3, cols)  # leading dimensions, no bias
        assert_reassociation_close(kernels.lut_linear(x, packed, table, bits, rows, cols), x, weight)
    assert vectorized >= 2  # the vector kernel itself was checked, not only the scalar loop


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_group_table_as_rows_by_groups_per_row_by_levels(bits):
    rows, cols, group_size = 24, 256, 64
    packed, table, weight = random_layer(bits, rows, cols, "per_group", group_size)
    grouped = table.reshape(rows, cols // group_size, 2**bits)  # [rows, groups_per_row, 2**bits]
    assert kernels.table_layout(grouped, rows, cols) == ((cols // group_size) * 2**bits, group_size)
    assert kernels.vectorized(bits, cols, group_size)
    assert torch.equal(kernels.decode(packed, grouped, bits, rows, cols), weight)
    x = torch.randn(3, cols)
    assert_reassociation_close(kernels.lut_linear(x, packed, grouped, bits, rows, cols), x, weight)
    # a group spanning two rows is not a layout the kernels read: the caller falls back
    assert kernels.lut_linear(x, packed, table[: rows // 2], bits, rows, cols) is None


@pytest.fixture(scope="module")
def minilm_linears():
    from transformers import AutoModel, AutoTokenizer

    from adq_hf.data import minilm_path

    path = minilm_path()
    model = AutoModel.from_pretrained(path).eval()
    tokens = AutoTokenizer.from_pretrained(path)(["Quantized weights are read as four-bit codes."], return_tensors="pt")
    with torch.no_grad():
        hidden = model.embeddings(input_ids=tokens["input_ids"])[0]  # real activations, [tokens, 384]
        inner = F.gelu(model.encoder.layer[0].intermediate.dense(hidden))
    layer = model.encoder.layer[0]
    return [(layer.attention.self.query, hidden), (layer.intermediate.dense, hidden), (layer.output.dense, inner)]


@pytest.mark.slow
@pytest.mark.parametrize("bits", range(2, 9))
def test_fused_matmul_on_real_minilm_weights_equals_the_fake_quant_layer(minilm_linears, bits):
    """ADQ codebooks per tensor and per channel (the fake-quant QuantLinear as reference), and per-group
    tables of 64 columns (quantiles of each group: the codebook branch's layout) on real weights."""
    for linear, x in minilm_linears:
        for granularity in ("per_tensor", "per_channel"):
            model = torch.nn.Sequential(copy.deepcopy(linear))
            adq_hf.quantize_model(model, ADQConfig(weight_bits=bits, activation_bits=None, granularity=granularity,
                                                   first_layer_bits=bits, last_layer_bits=bits))
            fake_quant = model[0].eval()
            deployed = convert_for_inference(copy.deepcopy(model))[0]
            for rows in (1, min(kernels.FUSED_MAX_ROWS[bits], len(x))):
                with torch.no_grad():
                    weight, expected, got = fake_quant.quantized_weight(), fake_quant(x[:rows]), deployed(x[:rows])
                assert deployed.fused_linear(x[:rows]) is not None
                assert_reassociation_close(got, x[:rows], weight, linear.bias)
                assert_reassociation_close(expected, x[:rows], weight, linear.bias)  # the reference is F.linear
        out_features, in_features = linear.weight.shape
        group_size, levels = 64, 2**bits
        groups = linear.weight.detach().reshape(-1, group_size)
        table = torch.quantile(groups, torch.linspace(0, 1, levels), dim=1).T.contiguous()  # [groups, levels]
        codes = (groups.unsqueeze(-1) - table.unsqueeze(1)).abs().argmin(-1)
        weight = torch.gather(table, 1, codes).reshape(out_features, in_features)
        grouped = table.reshape(out_features, in_features // group_size, levels)
        got = kernels.lut_linear(x[:3], pack_codes(codes, bits), grouped, bits, out_features, in_features, linear.bias)
        assert_reassociation_close(got, x[:3], weight, linear.bias)


def _capture_inputs(model, x):
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: inputs.__setitem__(n, args[0].detach()))
             for n, m in adq_hf.quantized_layers(model)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return inputs


@pytest.mark.parametrize("config", [
    ADQConfig(weight_bits=4, activation_bits=4, first_layer_bits=4, last_layer_bits=4),
    ADQConfig(weight_bits=3, activation_bits=3, weight_quantizer="lsq", activation_quantizer="lsq",
              granularity="per_channel", first_layer_bits=3, last_layer_bits=3),
    ADQConfig(weight_bits=2, activation_bits=8, weight_quantizer="post", activation_quantizer="asq"),
], ids=["adq-w4a4", "lsq-w3a3-per-channel", "post-w2-asq-a8"])
def test_fused_layers_with_activation_quantization_equal_fake_quant(config):
    """Each deployed Linear (input quantized exactly, then the fused matmul) against its fake-quant layer
    on the same inputs: quantized input and weight are the same, only the summation order differs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.ReLU(), torch.nn.Linear(64, 40), torch.nn.GELU(),
                                torch.nn.Linear(40, 10))
    calibration = torch.randn(32, 96)
    adq_hf.quantize_model(model, config, calibration_data=[calibration])
    model.eval()
    deployed = convert_for_inference(copy.deepcopy(model))
    for rows in (1, 7):
        x = torch.randn(rows, 96)
        inputs = _capture_inputs(model, x)
        for name, fake_quant in adq_hf.quantized_layers(model):
            layer = deployed.get_submodule(name)
            with torch.no_grad():
                quantized_input, weight = fake_quant.quantize_input(inputs[name]), fake_quant.quantized_weight()
                got = layer(inputs[name])
            assert layer.fused_linear(quantized_input) is not None
            assert_reassociation_close(got, quantized_input, weight, fake_quant.bias)


def test_conv_with_few_output_positions_runs_im2col_and_the_fused_matmul():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 6, 3, padding=1, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(6, 5, 2))
    x = torch.randn(1, 8, 5, 5)  # 3x3 then 2x2 output positions: below the fused kernel's row limit
    adq_hf.quantize_model(model, ADQConfig(weight_bits=4, activation_bits=3, first_layer_bits=4, last_layer_bits=4),
                          calibration_data=[x])
    model.eval()
    deployed = convert_for_inference(copy.deepcopy(model))
    inputs = _capture_inputs(model, x)
    for name, fake_quant in adq_hf.quantized_layers(model):
        layer = deployed.get_submodule(name)
        with torch.no_grad():
            quantized_input = fake_quant.quantize_input(inputs[name])
            assert layer._fused_conv(quantized_input) is not None
            got, expected = layer(inputs[name]), fake_quant(inputs[name])
            cols = F.unfold(quantized_input, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
            bound = reassociation_bound(cols.transpose(1, 2), fake_quant.quantized_weight().flatten(1), fake_quant.bias)
        assert ((got - expected).abs().flatten(2).transpose(1, 2) <= bound).all()
    with torch.no_grad():  # a batch with many positions: decode + conv, bit for bit
        batch = torch.randn(4, 8, 9, 9)
        assert torch.equal(deployed(batch), model(batch))


def test_n2uq_count_kernel_is_exact_at_every_threshold():
    from adq_hf.deploy import n2uq_thresholds
    from adq_hf.quantizers import N2UQActivationQuantizer

    torch.manual_seed(0)
    for trial, bits in enumerate((2, 3, 4, 8)):  # 8 bits: 255 thresholds, the binary search
        quantizer = N2UQActivationQuantizer(bits)
        sample = torch.randn(4000) * 3
        quantizer.init_from(sample if trial % 2 else sample.relu())
        with torch.no_grad():
            quantizer.raw_intervals.mul_(torch.empty(2**bits - 1).uniform_(0.2, 3))
        t = n2uq_thresholds(quantizer)
        x = torch.cat([t, torch.nextafter(t, torch.full_like(t, -math.inf)), torch.nextafter(t, torch.full_like(t, math.inf)),
                       sample, torch.tensor([0.0, -1e30, 1e30])])
        with torch.no_grad():
            assert torch.equal(kernels.count_thresholds(x, t, quantizer.zero_point, quantizer.scale), quantizer(x))


@pytest.mark.slow
def test_default_deploy_uses_the_fused_kernel_on_minilm_at_one_short_sequence():
    from transformers import AutoModel, AutoTokenizer

    from adq_hf.data import minilm_path

    path = minilm_path()
    batch = dict(AutoTokenizer.from_pretrained(path)(["Small and fast."], return_tensors="pt"))
    assert batch["input_ids"].numel() <= kernels.FUSED_MAX_ROWS[4]
    model = AutoModel.from_pretrained(path, quantization_config=ADQConfig(weight_bits=4)).eval()
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    convert_for_inference(model)
    calls = []
    linear = kernels.LutPlan.linear
    kernels.LutPlan.linear = lambda plan, x: calls.append(1) or linear(plan, x)
    try:
        with torch.no_grad():
            got = model(**batch).last_hidden_state
    finally:
        kernels.LutPlan.linear = linear
    assert len(calls) == len(adq_hf.quantized_layers(model))
    assert float((got - expected).norm() / expected.norm()) < 1e-5
    set_exact(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, expected)


@pytest.fixture
def rebuild_after(monkeypatch):
    yield monkeypatch
    monkeypatch.undo()
    kernels.build_kernels(retry=True)


def _tiny_deployed():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    adq_hf.quantize_model(model, ADQConfig(weight_bits=4, activation_bits=4, first_layer_bits=4, last_layer_bits=4),
                          calibration_data=[torch.randn(8, 32)])
    model.eval()
    x = torch.randn(1, 32)
    with torch.no_grad():
        expected = model(x)
    return convert_for_inference(model), x, expected


def test_without_the_kernels_deploy_mode_runs_pytorch_ops_bit_for_bit(rebuild_after):
    rebuild_after.setenv("ADQ_HF_KERNELS", "0")
    assert kernels.build_kernels(retry=True) is None
    info = kernels.kernel_info()
    assert not info["available"] and "ADQ_HF_KERNELS=0" in info["error"]
    model, x, expected = _tiny_deployed()
    assert isinstance(model[0], DeployedLayerMixin) and model[0].fused_linear(x) is None
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_a_failed_build_warns_and_falls_back(rebuild_after, tmp_path):
    rebuild_after.setenv("ADQ_HF_KERNEL_CACHE", str(tmp_path))  # nothing cached there
    rebuild_after.setenv("CXX", "false")  # a "compiler" that fails
    with pytest.warns(UserWarning, match="could not be built"):
        assert kernels.build_kernels(retry=True) is None
    assert "failed" in kernels.kernel_info()["error"]
    model, x, expected = _tiny_deployed()
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_deployed_models_copy_and_pickle_after_running_the_kernels(tmp_path):
    """The kernels' per-layer plan (pointers, the loaded library) is derived state: copies and pickles
    leave it out and build their own (deepcopy used to fail on it)."""
    model, x, _ = _tiny_deployed()
    with torch.no_grad():
        expected = model(x)  # builds the plans
        twin = copy.deepcopy(model)
        assert torch.equal(twin(x), expected)
    assert twin[0].lut_plan() is not None and twin[0].lut_plan() is not model[0].lut_plan()
    torch.save(model, tmp_path / "model.pt")
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=False)(x), expected)
