"""The fused training forward/backward (adq_hf/quantizers/fake_quant.py and the quantizers that use
it) against frozen copies of the implementations they replaced (below, as of commit d791487).

Outputs must be bit-identical (``torch.equal``) and every gradient mask identical (the same elements
get no gradient). Gradient values may differ only by the order of float operations: in float64 the
two implementations agree to 1e-9 relative; in float32 the input gradient to 1e-4 relative to its
largest entry (``g * (s / d)`` instead of ``(g * s) / d``) and the quantizer parameters' to 1e-3 of
theirs (sums of ~1e5 terms that largely cancel, taken in another order).
"""

import math

import pytest
import torch

from adq_hf.quantizers import (
    ASQActivationQuantizer,
    CodebookWeightQuantizer,
    LSQActivationQuantizer,
    LSQWeightQuantizer,
    N2UQActivationQuantizer,
)
from adq_hf.quantizers import n2uq
from adq_hf.quantizers.codebook import nearest_codes
from adq_hf.quantizers.fake_quant import UniformFakeQuant, smallest_float_where

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ the previous implementations

def ref_straight_through(value, surrogate):
    return value.detach() + (surrogate - surrogate.detach())


def ref_round_ste(x):
    return ref_straight_through(torch.round(x), x)


def ref_grad_scale(x, scale):
    return ref_straight_through(x, x * scale)


class RefN2UQFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, start, d, scale, zero_point: int):
        lower = torch.cat([start.reshape(1), start + torch.cumsum(d, 0)[:-1]])  # L_0 .. L_{n-1}
        j = torch.searchsorted(lower[1:].contiguous(), x.contiguous(), right=True)
        u = (x - lower[j]) / d[j]
        level = j.to(x.dtype) + (u >= 0.5).to(x.dtype) + zero_point
        ctx.save_for_backward(j, u, d, scale, level)
        return scale * level

    @staticmethod
    def backward(ctx, grad_out):
        j, u, d, scale, level = ctx.saved_tensors
        n = d.numel()
        inside = (u > 0) & (u < 1)
        slope = torch.where(inside, grad_out * scale / d[j], torch.zeros((), dtype=grad_out.dtype))
        flat_j = j.reshape(-1)
        per_edge = torch.bincount(flat_j, weights=slope.reshape(-1), minlength=n)
        per_width = torch.bincount(flat_j, weights=(slope * u).reshape(-1), minlength=n)
        grad_start = -per_edge.sum()
        later_edges = per_edge.flip(0).cumsum(0).flip(0) - per_edge
        grad_d = -(later_edges + per_width)
        grad_scale = (grad_out * level).sum()
        return slope, grad_start.to(d.dtype), grad_d.to(d.dtype), grad_scale.reshape(scale.shape), None


def ref_n2uq(q, x):
    n = q.raw_intervals.numel()
    g = 1.0 / math.sqrt(x.numel() * n)
    start, scale = ref_grad_scale(q.start, g), ref_grad_scale(q.scale, g)
    d = ref_grad_scale(q.raw_intervals, g).abs() + 1e-6
    return RefN2UQFunction.apply(x, start, d, scale, q.zero_point)


def ref_lsq_activation(q, x, step=None):
    qmin, qmax = q.int_range()
    step = ref_grad_scale(q.step, 1.0 / math.sqrt(x.numel() * qmax)) if step is None else step
    return ref_round_ste(torch.clamp(x / step, qmin, qmax)) * step


def ref_asq(q, x):
    qmin, qmax = q.int_range()
    beta = q.multiplier(x)
    per_beta = x.numel() // max(beta.numel(), 1)
    step = ref_grad_scale(q.step, 1.0 / math.sqrt(x.numel() * qmax)) * ref_grad_scale(
        beta, 1.0 / math.sqrt(per_beta * qmax))
    return ref_lsq_activation(q, x, step)


def ref_lsq_weight(q, weight):
    rows = q._rows(weight)
    step = ref_grad_scale(q.step, 1.0 / math.sqrt(rows.shape[1] * q.qmax))
    ints = ref_round_ste(torch.clamp(rows / step, q.qmin, q.qmax))
    return (ints * step).reshape(weight.shape).to(weight.dtype)


def ref_nearest_codes(rows, codebook):
    midpoints = (codebook[:, 1:] + codebook[:, :-1]) / 2
    return torch.searchsorted(midpoints.contiguous(), rows.contiguous())


# ------------------------------------------------------------------ helpers

def run(fn, module, x, grad_out):
    """Output and the gradients of the input and every parameter of ``module``."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    out = fn(module, x)
    out.backward(grad_out)
    grads = {"input": x.grad} if x.requires_grad else {}
    grads.update({name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None})
    return out.detach(), grads


def assert_same(new, ref, dtype):
    (out_new, grads_new), (out_ref, grads_ref) = new, ref
    assert torch.equal(out_new, out_ref)
    assert grads_new.keys() == grads_ref.keys() and grads_ref
    for name, g_ref in grads_ref.items():
        # float32 parameter gradients are sums of ~1e5 terms that largely cancel: 1e-3 of the result
        rtol = 1e-9 if dtype == torch.float64 else 1e-4 if name == "input" else 1e-3
        g_new = grads_new[name]
        assert torch.equal(g_new == 0, g_ref == 0), f"{name}: another set of elements gets no gradient"
        assert (g_new - g_ref).abs().max() <= rtol * max(g_ref.abs().max().item(), 1e-30), name


def edge_cases(points: torch.Tensor) -> torch.Tensor:
    """Each point and its float neighbours, two ulps either way."""
    down, up = torch.full_like(points, -math.inf), torch.full_like(points, math.inf)
    out = [points]
    for direction in (down, up):
        step = points
        for _ in range(2):
            step = torch.nextafter(step, direction)
            out.append(step)
    return torch.cat(out)


def trained_n2uq(bits, signed, dtype, seed=0):
    """An initialised N2UQ quantizer whose intervals, start and scale have moved (as after training)."""
    torch.manual_seed(seed)
    x = torch.randn(4096, dtype=dtype)
    q = N2UQActivationQuantizer(bits).to(dtype)
    q.init_from(x if signed else x.relu())
    with torch.no_grad():
        q.raw_intervals.mul_(torch.rand_like(q.raw_intervals) + 0.5)
        q.start.add_(0.05 * q.scale)
        q.scale.mul_(1.1)
    return q


def n2uq_inputs(q, dtype, signed, shape=(32, 8, 12, 12)):
    """Random inputs with exact zeros, every edge L_k, every threshold and their neighbours planted."""
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=dtype) * 2 * q.scale.detach()
    x = x if signed else x.relu()
    d = (q.raw_intervals.abs() + 1e-6).detach()
    lower = n2uq._lower_edges(q.start.detach(), d)
    planted = edge_cases(torch.cat([lower, lower + d / 2, lower + d, torch.zeros(1, dtype=dtype)]))
    flat = x.reshape(-1).clone()
    flat[: planted.numel()] = planted
    return flat.reshape(shape)


# ------------------------------------------------------------------ N2UQ

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_n2uq_matches_the_previous_implementation(bits, signed, dtype):
    q = trained_n2uq(bits, signed, dtype)
    x = n2uq_inputs(q, dtype, signed).requires_grad_()
    grad_out = torch.randn(x.shape, dtype=dtype)
    assert_same(run(N2UQActivationQuantizer.forward, q, x, grad_out), run(ref_n2uq, q, x, grad_out), dtype)


def test_n2uq_few_intervals_path_is_taken_up_to_4_bits_and_without_input_gradient():
    for bits, expected in ((2, "_N2UQFewIntervalsBackward"), (4, "_N2UQFewIntervalsBackward"),
                           (5, "_N2UQFunctionBackward")):
        q = trained_n2uq(bits, False, torch.float32)
        x = n2uq_inputs(q, torch.float32, False).requires_grad_()
        assert type(q(x).grad_fn).__name__ == expected
    # a first layer's input (an image) needs no gradient: the quantizer's parameters still get theirs
    q = trained_n2uq(2, True, torch.float32)
    x = n2uq_inputs(q, torch.float32, True)
    grad_out = torch.randn(x.shape)
    new, ref = run(N2UQActivationQuantizer.forward, q, x, grad_out), run(ref_n2uq, q, x, grad_out)
    assert "input" not in new[1]
    assert_same(new, ref, torch.float32)


def test_n2uq_bfloat16_input_keeps_the_previous_result():
    q = trained_n2uq(2, False, torch.float32)
    x = n2uq_inputs(q, torch.float32, False).to(torch.bfloat16)
    assert torch.equal(q(x), ref_n2uq(q, x))


# ------------------------------------------------------------------ the exact thresholds

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_smallest_float_where_finds_the_switching_float(dtype):
    torch.manual_seed(0)
    lower = torch.cat([torch.randn(200, dtype=dtype) * 10, torch.tensor([0.0, -1e-3, 1e8, -3.0], dtype=dtype)])
    width = torch.cat([torch.rand(200, dtype=dtype) + 1e-3, torch.tensor([1e-6, 2e-3, 1.0, 6.0], dtype=dtype)])
    for level, strict in ((0.5, False), (1.0, False), (0.0, True)):
        def rule(t):
            u = (t - lower) / width
            return u > level if strict else u >= level

        for guess in (lower + width * level, lower + 10 * width):  # a good guess, and one that forces a search
            t = smallest_float_where(rule, lower, guess)
            below = torch.nextafter(t, torch.full_like(t, -math.inf))
            assert rule(t).all() and not rule(below).any()


# ------------------------------------------------------------------ LSQ, ASQ

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [2, 4])
def test_lsq_activation_matches_the_previous_implementation(bits, signed, dtype):
    torch.manual_seed(bits)
    x = torch.randn(16, 8, 10, 10, dtype=dtype) * 2
    x = x if signed else x.relu()  # exact zeros sit on the lower bound
    q = LSQActivationQuantizer(bits).to(dtype)
    q.init_from(x)
    qmin, qmax = q.int_range()
    step = q.step.detach()
    flat = x.reshape(-1)
    flat[:6] = torch.tensor([qmin, qmax, qmin + 0.5, qmax - 0.5, qmax + 3, qmin - 3], dtype=dtype) * step
    grad_out = torch.randn(x.shape, dtype=dtype)
    x.requires_grad_()
    assert_same(run(LSQActivationQuantizer.forward, q, x, grad_out), run(ref_lsq_activation, q, x, grad_out), dtype)
    assert type(q(x).grad_fn).__name__ == "UniformFakeQuantBackward"


@pytest.mark.parametrize("granularity_groups", [1, 6])
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_lsq_weight_matches_the_previous_implementation(bits, granularity_groups):
    torch.manual_seed(bits)
    weight = torch.randn(6, 4, 3, 3)
    q = LSQWeightQuantizer(bits, num_groups=granularity_groups)
    q.init_from(weight)
    grad_out = torch.randn(weight.shape)
    weight.requires_grad_()
    assert_same(run(LSQWeightQuantizer.forward, q, weight, grad_out), run(ref_lsq_weight, q, weight, grad_out),
                torch.float32)


@pytest.mark.parametrize("channel_dim, shape", [(1, (8, 16, 6, 6)), (-1, (4, 7, 16))])
def test_asq_matches_the_previous_implementation(channel_dim, shape):
    torch.manual_seed(0)
    x = torch.randn(shape).relu()
    q = ASQActivationQuantizer(2, 16, channel_dim=channel_dim)
    q.init_from(x)
    with torch.no_grad():  # a trained adapter: beta differs per sample / token
        q.adapter.out_weight.normal_(0, 0.3)
    grad_out = torch.randn(shape)
    x.requires_grad_()
    assert_same(run(ASQActivationQuantizer.forward, q, x, grad_out), run(ref_asq, q, x, grad_out), torch.float32)


def test_uniform_fake_quant_sums_the_step_gradient_to_its_shape():
    torch.manual_seed(0)
    x = torch.randn(3, 5, requires_grad=True)
    for step_shape in ((), (3, 1), (1, 5), (3, 5)):
        step = (torch.rand(step_shape) + 0.5).requires_grad_()
        UniformFakeQuant.apply(x, step, -2, 1, 0.5).sum().backward()
        assert step.grad.shape == step.shape
        expected = torch.autograd.grad(ref_round_ste(torch.clamp(x / step, -2, 1)).mul(step).sum(), step)[0]
        assert torch.allclose(step.grad, 0.5 * expected, rtol=1e-6)
        step.grad = None


# ------------------------------------------------------------------ codebook encoding

@pytest.mark.parametrize("groups", [1, 5])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_nearest_codes_match_the_binary_search(bits, groups):
    torch.manual_seed(bits)
    weight = torch.randn(5, 512)
    q = CodebookWeightQuantizer(bits, num_groups=groups, init_iters=3)
    q.init_from(weight)
    rows = q._rows(weight).clone()
    book = q.codebook
    midpoints = (book[:, 1:] + book[:, :-1]) / 2
    rows[:, : midpoints.shape[1]] = midpoints  # exact ties go to the lower level
    rows[:, -1] = book[:, -1] + 1.0
    assert torch.equal(nearest_codes(rows, book), ref_nearest_codes(rows, book))
