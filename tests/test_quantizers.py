"""Quantizers checked against hand-computed values and their documented rules; b-bit packing."""

import math

import pytest
import torch
from torch import nn

from adq_hf import ADQConfig
from adq_hf.packing import pack_codes, packed_size, unpack_codes
from adq_hf.quantizers import (
    WEIGHT_QUANTIZERS,
    CodebookWeightQuantizer,
    LSQActivationQuantizer,
    LSQWeightQuantizer,
    N2UQActivationQuantizer,
    make_activation_quantizer,
    make_weight_quantizer,
)
from adq_hf.quantizers.base import grad_scale, straight_through
from adq_hf.quantizers.codebook import initial_codebook, nearest_codes


pytestmark = pytest.mark.usefixtures("one_thread")

# negative magnitudes 1..4 (mass 10), positive 1..8 (mass 36)
KNOWN = torch.tensor([[-4.0, -3.0, -2.0, -1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])


# ---------------------------------------------------------------- codebook (ADQ) initialisation

def test_quantile_levels_by_hand_2_bits():
    # 3 non-zero levels; the positive side has more total magnitude (36 > 10), so it gets two.
    # torch.quantile (linear interpolation, position p * (n - 1)):
    #   negative 1..4 at p = 0.5        -> position 1.5        -> 2.5
    #   positive 1..8 at p = 0.25, 0.75 -> positions 1.75, 5.25 -> 2.75, 6.25
    book = initial_codebook(KNOWN, 2)
    assert book.tolist() == [[-2.5, 0.0, 2.75, 6.25]]


def test_quantile_levels_by_hand_3_bits():
    # 7 non-zero levels: 4 positive, 3 negative.
    #   negative 1..4 at p = 1/6, 1/2, 5/6          -> positions 0.5, 1.5, 2.5          -> 1.5, 2.5, 3.5
    #   positive 1..8 at p = 1/8, 3/8, 5/8, 7/8     -> positions 0.875, 2.625, 4.375, 6.125
    #                                               -> 1.875, 3.625, 5.375, 7.125
    book = initial_codebook(KNOWN, 3)[0].tolist()
    assert book == pytest.approx([-3.5, -2.5, -1.5, 0.0, 1.875, 3.625, 5.375, 7.125], abs=1e-6)
    assert book[3] == 0.0  # exactly zero


def test_odd_level_goes_to_the_heavier_side_per_row():
    rows = torch.cat([KNOWN, -KNOWN, torch.tensor([[-2.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0]])])
    book = initial_codebook(rows, 2).tolist()
    assert book[0] == [-2.5, 0.0, 2.75, 6.25]
    assert book[1] == [-6.25, -2.75, 0.0, 2.5]  # mirrored: the negative side is heavier now
    # equal masses: the positive side gets the odd level; exact zero weights belong to no side
    assert book[2] == [-1.5, 0.0, 1.25, 1.75]


def test_one_sided_all_zero_and_uniform_init():
    book = initial_codebook(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), 2)[0]
    # no negative weights: the negative side mirrors the positive magnitudes (quantile 0.5 of 1..4)
    assert book.tolist() == [-2.5, 0.0, 1.75, 3.25]
    zero = initial_codebook(torch.zeros(1, 6), 2)[0]
    assert (zero == 0).sum() == 1 and zero.unique().numel() == 4  # distinct levels, one exact zero
    q = CodebookWeightQuantizer(2)
    q.init_from(torch.zeros(6))
    assert torch.equal(q(torch.zeros(6)), torch.zeros(6))
    # uniform: levels s..k*s with the squared-error-minimising step among max/k * (1..64)/64.
    #   negative 1..4, one level: s = 3 rounds 1 to zero and 2, 3, 4 to 3 (error 1 + 1 + 0 + 1 = 3;
    #   s = 2.75 gives 3.19, s = 3.25 gives 3.19); positive 1..8, two levels: s = 3.5 (error 8)
    assert initial_codebook(KNOWN, 2, init="uniform")[0].tolist() == [-3.0, 0.0, 3.5, 7.0]


@pytest.mark.parametrize("bits", [2, 3])
def test_refined_codebook_is_the_fixed_point_of_the_ema_update(bits):
    # quantiles sit inside the cluster means; refinement moves them there, so the EMA update has
    # nothing left to move at the start of training, and the weights' squared rounding error drops
    torch.manual_seed(0)
    weight = torch.randn(64, 3, 3, 3)
    raw, refined = CodebookWeightQuantizer(bits, init_iters=0), CodebookWeightQuantizer(bits)  # default: refined
    raw.init_from(weight)
    refined.init_from(weight)
    assert not torch.allclose(raw.codebook, refined.codebook, atol=1e-3)
    assert (refined.codebook == 0).sum() == 1 and (refined.codebook.diff(dim=1) > 0).all()
    before = refined.codebook.clone()
    refined.ema_update(weight)
    assert torch.allclose(refined.codebook, before, atol=1e-5)
    mse = {name: ((q.decode(q.encode(weight)) - weight) ** 2).mean() for name, q in (("raw", raw), ("refined", refined))}
    assert mse["refined"] < 0.9 * mse["raw"]
    # the ablation's raw quantiles: one EMA step moves them by (1 - decay) of the way to the means
    moved = raw.codebook.clone()
    raw.ema_update(weight)
    assert not torch.allclose(raw.codebook, moved, atol=1e-4)


def test_config_sets_the_refinement():
    q = make_weight_quantizer(ADQConfig(weight_bits=2), 2, (8, 4))
    assert q.init_iters == 30
    assert make_weight_quantizer(ADQConfig(weight_bits=2, codebook_init_iters=0), 2, (8, 4)).init_iters == 0


@pytest.mark.parametrize("bits", range(2, 9))
def test_codebook_shape_sorted_one_exact_zero(bits):
    torch.manual_seed(bits)
    book = initial_codebook(torch.randn(3, 500), bits)
    assert book.shape == (3, 2**bits)
    assert (book[:, 1:] >= book[:, :-1]).all()
    assert ((book == 0).sum(dim=1) == 1).all()


def test_nearest_codes_ties_go_to_the_lower_level():
    book = torch.tensor([[-2.0, 0.0, 1.0, 3.0]])
    rows = torch.tensor([[-5.0, -1.0, -0.9, 0.5, 0.51, 2.0, 2.1, 9.0]])
    assert nearest_codes(rows, book).tolist() == [[0, 0, 1, 1, 2, 2, 3, 3]]


# ---------------------------------------------------------------- codebook EMA adaptation

def test_one_ema_step_equals_the_formula_and_keeps_zero():
    q = CodebookWeightQuantizer(2, ema_decay=0.9, init_iters=0)  # the raw quantiles, from the test above
    q.init_from(KNOWN)
    # nearest level (midpoints -1.25, 1.375, 4.5): {-4,-3,-2} -> -2.5, {-1, 1} -> 0, {2,3,4} -> 2.75, {5..8} -> 6.25
    q.ema_update(KNOWN)
    m = 0.9
    expected = [m * -2.5 + (1 - m) * -3.0, 0.0, m * 2.75 + (1 - m) * 3.0, m * 6.25 + (1 - m) * 6.5]
    assert q.codebook[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert q.codebook[0, 1].item() == 0.0  # zero is fixed although -1 and 1 (mean 0) are assigned to it
    assert int(q.num_updates) == 1


def test_zero_level_stays_zero_with_asymmetric_assignment():
    q = CodebookWeightQuantizer(2, ema_decay=0.5)
    q.codebook.copy_(torch.tensor([[-4.0, 0.0, 2.0, 6.0]]))
    w = torch.tensor([[0.1, 0.2, 0.3, -4.0, 2.0, 6.0]])  # the zero level gets weights of mean 0.2
    q.ema_update(w)
    assert q.codebook.tolist() == [[-4.0, 0.0, 2.0, 6.0]]


def test_empty_level_is_left_unchanged():
    q = CodebookWeightQuantizer(2, ema_decay=0.5)
    q.codebook.copy_(torch.tensor([[-2.5, 0.0, 2.75, 100.0]]))
    q.ema_update(KNOWN)  # midpoint 51.375: no weight is assigned to 100
    assert q.codebook[0, 3].item() == 100.0
    assert q.codebook[0, 2].item() == pytest.approx(0.5 * 2.75 + 0.5 * 5.0)  # 2..8 all go to 2.75 now
    assert q.codebook[0, 0].item() == pytest.approx(0.5 * -2.5 + 0.5 * -3.0)


def _ema_reference(book, rows, m):
    """The documented EMA step, one level at a time."""
    out = book.clone()
    for r in range(book.shape[0]):
        levels = book[r].tolist()
        for k, level in enumerate(levels):
            assigned = [w for w in rows[r].tolist() if min(range(len(levels)), key=lambda i: (abs(w - levels[i]), i)) == k]
            if assigned and level != 0:
                out[r, k] = m * level + (1 - m) * sum(assigned) / len(assigned)
    return out.sort(dim=1).values


def test_per_channel_ema_matches_the_reference():
    torch.manual_seed(0)
    w = torch.randn(4, 40)
    q = CodebookWeightQuantizer(3, num_groups=4, ema_decay=0.8)
    q.init_from(w)
    before = q.codebook.clone()
    w2 = w + 0.3 * torch.randn_like(w)
    q.ema_update(w2)
    assert torch.allclose(q.codebook, _ema_reference(before, w2, 0.8), atol=1e-6)


def test_ema_runs_once_per_optimizer_step_and_never_in_eval():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 16))
    q = CodebookWeightQuantizer(2, ema_decay=0.5)
    q.init_from(w.detach())
    initial = q.codebook.clone()
    opt = torch.optim.SGD([w], lr=0.5)
    q.train()
    q(w).pow(2).sum().backward()
    q(w).pow(2).sum().backward()  # gradient accumulation before any step: nothing to adapt to
    assert int(q.num_updates) == 0 and torch.equal(q.codebook, initial)
    opt.step()
    q(w)
    expected = CodebookWeightQuantizer(2, ema_decay=0.5)
    expected.codebook.copy_(initial)
    expected.ema_update(w.detach())  # the update uses the weights after the step
    assert int(q.num_updates) == 1 and torch.equal(q.codebook, expected.codebook)
    q(w)
    q(w)  # more micro-batches on the same weights do not update again
    assert int(q.num_updates) == 1 and torch.equal(q.codebook, expected.codebook)
    opt.step()
    with torch.no_grad():
        q(w)  # no_grad in train mode (e.g. a validation pass without eval()) does not adapt
    assert int(q.num_updates) == 1
    q.eval()
    opt.step()
    q(w)
    assert int(q.num_updates) == 1
    q.train()
    q(w)  # back in training: the weights moved, one update
    assert int(q.num_updates) == 2


def test_ema_sees_a_fused_optimizer_step():
    # fused optimizers update parameters without bumping their version counter: the step is seen
    # from the values
    w = nn.Parameter(torch.randn(4, 16))
    q = CodebookWeightQuantizer(2)
    q.init_from(w.detach())
    q.train()
    opt = torch.optim.AdamW([w], lr=0.1, fused=True)
    q(w).sum().backward()
    opt.step()
    q(w)
    assert int(q.num_updates) == 1


def test_ema_sees_each_step_when_every_forward_gets_a_fresh_copy_of_the_weight():
    # FSDP2 all-gathers the sharded weight into an unsharded tensor for each forward: the quantizer
    # never sees the parameter the optimiser updated, only a new tensor with the new values
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 16))
    q = CodebookWeightQuantizer(2, ema_decay=0.5)
    q.init_from(w.detach())
    q.train()
    opt = torch.optim.SGD([w], lr=0.1)
    for step in range(1, 4):
        q(w.detach().clone().requires_grad_()).sum().backward()
        q(w.detach().clone().requires_grad_())  # a second micro-batch on the same values: no update
        w.grad = torch.randn_like(w)
        opt.step()
        q(w.detach().clone().requires_grad_())
        assert int(q.num_updates) == step


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True),
    lambda p: torch.optim.SGD(p, lr=0.1, foreach=False),
    lambda p: torch.optim.AdamW(p, lr=0.1, foreach=True),
    lambda p: torch.optim.AdamW(p, lr=0.1, foreach=False),
], ids=["sgd-foreach", "sgd-loop", "adamw-foreach", "adamw-loop"])
def test_ema_sees_ordinary_optimizer_steps(make_opt):
    w = nn.Parameter(torch.randn(4, 16))
    q = CodebookWeightQuantizer(2)
    q.init_from(w.detach())
    q.train()
    opt = make_opt([w])
    for step in range(1, 3):
        q(w).sum().backward()
        opt.step()
        opt.zero_grad()
        q(w)
        assert int(q.num_updates) == step


def test_static_codebook_never_adapts():
    w = nn.Parameter(torch.randn(4, 16))
    q = make_weight_quantizer(ADQConfig(codebook_update="static"), 2, w.shape)
    q.init_from(w.detach())
    before = q.codebook.clone()
    q.train()
    with torch.no_grad():
        w.add_(1.0)
    q(w)
    assert int(q.num_updates) == 0 and torch.equal(q.codebook, before)


def test_update_interval_counts_optimizer_steps():
    w = nn.Parameter(torch.randn(4, 16))
    q = make_weight_quantizer(ADQConfig(ema_update_interval=3, ema_decay=0.9), 2, w.shape)
    q.init_from(w.detach())
    q.train()
    for _ in range(6):
        with torch.no_grad():
            w.add_(0.01)
        q(w)
        q(w)
    assert int(q.num_steps) == 6 and int(q.num_updates) == 2


# ---------------------------------------------------------------- codebook forward / STE

@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_forward_values_are_codebook_members(granularity, bits):
    torch.manual_seed(bits)
    w = torch.randn(8, 4, 3, 3)
    q = make_weight_quantizer(ADQConfig(weight_bits=bits, granularity=granularity), bits, w.shape)
    assert q.codebook.shape == ((8 if granularity == "per_channel" else 1), 2**bits)
    q.init_from(w)
    out = q(w)
    assert out.shape == w.shape and out.dtype == w.dtype
    rows = out.reshape(q.codebook.shape[0], -1)
    for r, row in enumerate(rows):
        values = set(row.unique().tolist())
        assert values <= set(q.codebook[r].tolist())
        assert len(values) <= 2**bits
    # each weight goes to its nearest level
    w_rows = w.reshape(q.codebook.shape[0], -1)
    dist = (w_rows.unsqueeze(-1) - q.codebook.unsqueeze(1)).abs()
    assert torch.allclose((w_rows - rows).abs(), dist.min(dim=-1).values)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_straight_through_gradient_is_ones(granularity):
    torch.manual_seed(0)
    w = torch.randn(6, 10, requires_grad=True)
    q = make_weight_quantizer(ADQConfig(granularity=granularity), 2, w.shape)
    q.init_from(w.detach())
    q.eval()
    q(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_straight_through_helpers():
    x = torch.tensor([0.3, -1.7], requires_grad=True)
    y = straight_through(torch.tensor([1.0, -2.0]), x * 3)
    assert y.tolist() == [1.0, -2.0]
    y.sum().backward()
    assert x.grad.tolist() == [3.0, 3.0]
    s = torch.tensor(2.0, requires_grad=True)
    z = grad_scale(s, 0.25)
    assert z.item() == 2.0
    z.backward()
    assert s.grad.item() == 0.25


# ---------------------------------------------------------------- N2UQ activations

def test_n2uq_thresholds_stay_sorted_after_a_large_step():
    torch.manual_seed(0)
    q = N2UQActivationQuantizer(3)
    q(torch.rand(256))
    opt = torch.optim.SGD(q.parameters(), lr=50.0)
    t = q.thresholds()
    # a loss whose minimum has the thresholds reversed: raise T_1, lower T_7
    (t[-1] - t[0]).backward()
    opt.step()
    assert (q.raw_intervals < 0).any()  # the raw values crossed zero ...
    t = q.thresholds().detach()
    assert (t[1:] > t[:-1]).all()  # ... the thresholds are still sorted
    x = torch.linspace(-5, 1000, 8001)
    y = q(x).detach()
    assert (y[1:] >= y[:-1]).all()  # so the quantizer is monotone
    ints = y / q.scale.detach()
    assert torch.equal(ints, ints.round()) and ints.min() == 0 and ints.max() == 7


def _uniform(x, step, lo, hi):
    return torch.clamp(torch.round(x / step), lo, hi) * step


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("magnitude", [1.0, 1e-3])
@pytest.mark.parametrize("estimator", ["mean", "mse"])
def test_n2uq_starts_as_the_uniform_quantizer(bits, magnitude, estimator):
    torch.manual_seed(bits)
    x = torch.randn(20000) * magnitude
    for signed, batch in ((True, x), (False, x.relu())):
        q = N2UQActivationQuantizer(bits)
        q.range_estimator = estimator
        y = q(batch).detach()
        assert bool(q.signed) == signed
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        qmax = hi
        if estimator == "mean":
            step = (2 * batch.abs().mean() / math.sqrt(qmax)).item()
            assert q.scale.item() == pytest.approx(step, rel=1e-6)  # LSQ's initial step
        assert torch.equal(y, _uniform(batch, q.scale.detach(), lo, hi))
        later = torch.randn(5000) * 3 * magnitude  # wider than the first batch: clipped, same grid
        assert torch.equal(q(later).detach(), _uniform(later, q.scale.detach(), lo, hi))


def test_n2uq_signedness_is_decided_on_the_first_batch():
    q = N2UQActivationQuantizer(2)
    q(torch.tensor([0.0, 0.0, 1.0, 2.0]))  # non-negative (ReLU output, zeros included): unsigned
    assert not bool(q.signed) and q.zero_point == 0
    y = q(torch.tensor([-3.0, -1.0, 5.0]))  # a later negative batch does not change it
    assert not bool(q.signed) and y[0].item() == 0.0 and y[1].item() == 0.0
    s = N2UQActivationQuantizer(2)
    s(torch.tensor([-1e-3, 1.0, 2.0]))
    assert bool(s.signed) and s.zero_point == -2
    assert s(torch.zeros(3)).abs().max() == 0  # zero maps to zero


@pytest.mark.parametrize("bits, signed", [(2, False), (3, True), (4, False), (8, True)])
def test_n2uq_outputs_are_integers_times_scale_in_range(bits, signed):
    torch.manual_seed(bits)
    x = torch.randn(4, 8, 5, 5) * 2
    x = x if signed else x.relu()
    q = N2UQActivationQuantizer(bits)
    q(x)
    with torch.no_grad():  # non-uniform intervals, a moved start and scale
        q.raw_intervals.mul_(torch.rand_like(q.raw_intervals) * 1.5 + 0.25)
        q.start.add_(0.05)
        q.scale.mul_(1.3)
    z = torch.cat([x.reshape(-1) * 3, torch.tensor([-1e4, 1e4])])  # and both ends of the range
    y = q(z).detach()
    scale = q.scale.detach()
    ints = (y / scale).round()
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    assert torch.equal(y, ints * scale)  # exactly an integer times the scale
    assert ints.min() == lo and ints.max() == hi
    # the integer level is lo + (number of thresholds at or below the input)
    t = q.thresholds().detach()
    expected = lo + (z.unsqueeze(1) >= t).sum(dim=1)
    near = ((z.unsqueeze(1) - t).abs() < 1e-5).any(dim=1)  # float rounding of the edges
    assert torch.equal(ints[~near], expected[~near].to(ints.dtype))


def test_n2uq_straight_through_slope_at_init():
    x = torch.linspace(-1, 5, 601, requires_grad=True)
    q = N2UQActivationQuantizer(2)
    q.range_estimator = "mean"
    q(torch.tensor([0.0, 1.0, 2.0, 3.0]))  # unsigned, step 2 * 1.5 / sqrt(3)
    q(x).sum().backward()
    step = q.scale.item()
    inside = (x.detach() > 0) & (x.detach() < 3 * step)
    assert torch.allclose(x.grad[inside], torch.ones(int(inside.sum())), atol=1e-5)  # scale / d = 1
    edge = ((x.detach()).abs() < 1e-4) | ((x.detach() - 3 * step).abs() < 1e-4)
    assert (x.grad[~inside & ~edge] == 0).all()  # clipped inputs get no gradient


def _n2uq_reference(q, x):
    """Autograd formulation of N2UQ's generalized STE (the closed-form backward must equal it)."""
    n = q.raw_intervals.numel()
    g = 1.0 / math.sqrt(x.numel() * n)
    start, scale = grad_scale(q.start, g), grad_scale(q.scale, g)
    d = grad_scale(q.raw_intervals, g).abs() + 1e-6
    lower = start + torch.cumsum(d, 0) - d
    j = torch.searchsorted(lower[1:].detach().contiguous(), x.detach().contiguous(), right=True)
    frac = torch.clamp((x - lower[j]) / d[j], 0.0, 1.0)
    level = j.to(x.dtype) + straight_through((frac >= 0.5).to(x.dtype), frac)
    return scale * (level + q.zero_point)


@pytest.mark.parametrize("bits, signed", [(2, False), (3, True), (4, False)])
def test_n2uq_gradients_reach_everything_and_equal_the_autograd_reference(bits, signed):
    torch.manual_seed(bits)
    x0 = torch.randn(4, 8, 6, 6) * 2
    x0 = x0 if signed else x0.relu()
    q = N2UQActivationQuantizer(bits)
    q(x0)
    with torch.no_grad():  # make the intervals non-uniform
        q.raw_intervals.mul_(torch.rand_like(q.raw_intervals) + 0.5)
    grads = []
    for fn in (q, lambda x: _n2uq_reference(q, x)):
        q.zero_grad()
        x = x0.clone().requires_grad_()
        y = fn(x)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        grads.append((y.detach(), x.grad, q.start.grad.clone(), q.raw_intervals.grad.clone(), q.scale.grad.clone()))
    for ours, ref in zip(*grads):
        assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-6)
    x_grad, start_grad, interval_grad, scale_grad = grads[0][1:]
    assert x_grad.abs().sum() > 0 and start_grad.abs() > 0 and scale_grad.abs() > 0
    assert (interval_grad != 0).all()  # every interval gets a gradient


def test_make_activation_quantizer_by_name():
    assert isinstance(make_activation_quantizer(ADQConfig(activation_bits=3), 3), N2UQActivationQuantizer)
    q = make_activation_quantizer(ADQConfig(activation_bits=3, activation_quantizer="lsq"), 3)
    assert isinstance(q, LSQActivationQuantizer) and q.bits == 3


# ---------------------------------------------------------------- LSQ

@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_lsq_weight_grid_and_gradients(granularity, bits):
    torch.manual_seed(bits)
    w = (torch.randn(6, 20) * torch.linspace(0.1, 2, 6).unsqueeze(1)).requires_grad_()
    q = make_weight_quantizer(ADQConfig(weight_quantizer="lsq", granularity=granularity), bits, w.shape)
    assert isinstance(q, LSQWeightQuantizer)
    q.init_from(w.detach())
    assert q.step.shape == ((6 if granularity == "per_channel" else 1), 1)
    assert torch.allclose(q.step, 2 * w.detach().reshape(q.step.shape[0], -1).abs().mean(1, keepdim=True)
                          / math.sqrt(2 ** (bits - 1) - 1))
    out = q(w)
    step = q.step.detach()
    ints = out.detach().reshape(step.shape[0], -1) / step
    assert torch.allclose(ints, ints.round(), atol=1e-4)
    assert ints.round().min() >= -(2 ** (bits - 1)) and ints.round().max() <= 2 ** (bits - 1) - 1
    expected = torch.clamp(torch.round(w.detach().reshape(step.shape[0], -1) / step), -(2 ** (bits - 1)),
                           2 ** (bits - 1) - 1) * step
    assert torch.equal(out.detach().reshape(step.shape[0], -1), expected)
    out.pow(2).sum().backward()
    assert w.grad.abs().sum() > 0 and (q.step.grad.abs() > 0).all()


@pytest.mark.parametrize("bits", [2, 4])
def test_lsq_activation_grid_range_and_gradients(bits):
    torch.manual_seed(bits)
    for signed in (True, False):
        q = LSQActivationQuantizer(bits)
        q.range_estimator = "mean"  # LSQ's init puts the outliers beyond the range (MSE would keep them)
        x = torch.cat([torch.randn(256) * 2, torch.tensor([50.0, -50.0])])  # outliers beyond the range
        x = (x if signed else x.relu()).requires_grad_()
        y = q(x)
        assert bool(q.signed) == signed
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        ints = y.detach() / q.step.detach()
        assert torch.allclose(ints, ints.round(), atol=1e-5)
        assert ints.round().min() >= lo and ints.round().max() == hi
        y.pow(2).sum().backward()
        assert x.grad.abs().sum() > 0 and q.step.grad.abs() > 0
        clipped = x.detach() / q.step.detach() > hi + 0.5
        assert clipped.any() and (x.grad[clipped] == 0).all()  # no gradient through the clip


# ---------------------------------------------------------------- encode / decode

@pytest.mark.parametrize("method", sorted(WEIGHT_QUANTIZERS))
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_encode_decode_equals_forward(method, granularity, bits):
    torch.manual_seed(bits)
    w = nn.Parameter(torch.randn(5, 3, 3, 3))
    config = ADQConfig(weight_bits=bits, weight_quantizer=method, granularity=granularity)
    q = make_weight_quantizer(config, bits, w.shape)
    q.init_from(w.detach())
    q.train()
    opt = torch.optim.SGD([w, *q.parameters()], lr=0.05)
    q(w).pow(2).sum().backward()  # move the weights, the codebook (EMA) or the step away from init
    opt.step()
    q(w)
    q.eval()
    codes = q.encode(w)
    assert codes.dtype == torch.int64 and codes.shape == w.shape
    assert codes.min() >= 0 and codes.max() < 2**bits
    assert torch.equal(q.decode(codes), q(w).detach())
    assert q.levels().shape == (q.levels().shape[0], 2**bits)
    # a reloaded checkpoint's latent weight is decode(codes): quantizing it again must give the same values
    assert torch.equal(q(q.decode(codes)).detach(), q.decode(codes))


# ---------------------------------------------------------------- packing

@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [0, 1, 3, 7, 13, 1001])
def test_pack_round_trip_and_size(bits, n):
    torch.manual_seed(n)
    codes = torch.randint(0, 2**bits, (n,))
    if n:
        codes[0], codes[-1] = 2**bits - 1, 0
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_size(n, bits) == math.ceil(n * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_pack_keeps_shape_out_of_it():
    codes = torch.randint(0, 8, (4, 3, 5))
    assert torch.equal(unpack_codes(pack_codes(codes, 3), 3, codes.numel()).reshape(codes.shape), codes)


def test_pack_bit_order_by_hand():
    # LSB-first stream, stream bit k = bit k % 8 of byte k // 8
    # 2 bits: 1 -> 1,0  2 -> 0,1  3 -> 1,1  0 -> 0,0 : byte 0 = 0b00_11_10_01 = 0x39; then 1 -> 0x01
    assert pack_codes(torch.tensor([1, 2, 3, 0, 1]), 2).tolist() == [0x39, 0x01]
    # 3 bits: 5 = 101 in bits 0-2, 3 = 011 in bits 3-5 -> 0b00_011_101
    assert pack_codes(torch.tensor([5, 3]), 3).tolist() == [0b00011101]
    # a code across a byte boundary: three 7s are nine 1-bits
    assert pack_codes(torch.tensor([7, 7, 7]), 3).tolist() == [0xFF, 0x01]
    # 5 bits: 31 -> bits 0-4; 0 -> bits 5-9; 1 -> bit 10 = bit 2 of byte 1
    assert pack_codes(torch.tensor([31, 0, 1]), 5).tolist() == [0x1F, 0x04]
    # 6 bits: 0b101010 in stream bits 0-5, 0b000011 in bits 6-11 -> byte 0 = 0b11_101010, byte 1 = 0
    assert pack_codes(torch.tensor([0b101010, 0b000011]), 6).tolist() == [0b11101010, 0b00000000]
    assert pack_codes(torch.tensor([0xA5, 0x01, 0xFF]), 8).tolist() == [0xA5, 0x01, 0xFF]
    assert unpack_codes(torch.tensor([0x39, 0x01], dtype=torch.uint8), 2, 5).tolist() == [1, 2, 3, 0, 1]


def test_pack_errors():
    for bad in ([4], [-1], [0, 1, 2, 3, 7]):
        with pytest.raises(ValueError, match=r"codes must lie in \[0, 4\) for 2-bit"):
            pack_codes(torch.tensor(bad), 2)
    for bits in (0, 9):
        with pytest.raises(ValueError, match="bits must be in 1..8"):
            pack_codes(torch.tensor([0]), bits)
    with pytest.raises(ValueError, match="5 bytes for 20 2-bit codes, got \\(3,\\)"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 2, 20)
    with pytest.raises(ValueError, match="5 bytes"):
        unpack_codes(torch.zeros(6, dtype=torch.uint8), 2, 20)  # too long is wrong too
    with pytest.raises(ValueError, match="uint8 tensor .* torch.int64"):
        unpack_codes(torch.zeros(5, dtype=torch.int64), 2, 20)
    with pytest.raises(ValueError, match=r"1-D .*got \(1, 5\)"):
        unpack_codes(torch.zeros(1, 5, dtype=torch.uint8), 2, 20)
