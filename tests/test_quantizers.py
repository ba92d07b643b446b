import math

import pytest
import torch
from torch import nn

from adq_hf import ADQConfig
from adq_hf.packing import pack_codes, packed_size, unpack_codes
from adq_hf.quantizers import (
    CodebookWeightQuantizer,
    LSQActivationQuantizer,
    LSQWeightQuantizer,
    N2UQActivationQuantizer,
    make_weight_quantizer,
)
from adq_hf.quantizers.base import grad_scale, straight_through
from adq_hf.quantizers.codebook import initial_codebook

KNOWN = torch.tensor([[-4.0, -3.0, -2.0, -1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])


def test_quantile_levels_by_hand_2_bits():
    # 3 non-zero levels; positive mass 36 > negative mass 10, so the positive side gets two.
    # negative magnitudes 1..4 at q=0.5 -> 2.5; positive 1..8 at q=0.25, 0.75 -> 2.75, 6.25 (linear interpolation)
    assert initial_codebook(KNOWN, 2).tolist() == [[-2.5, 0.0, 2.75, 6.25]]


def test_quantile_levels_by_hand_3_bits():
    # negative q = 1/6, 1/2, 5/6 of 1..4 -> 1.5, 2.5, 3.5; positive q = 1/8, 3/8, 5/8, 7/8 of 1..8
    book = initial_codebook(KNOWN, 3)[0].tolist()
    assert book == pytest.approx([-3.5, -2.5, -1.5, 0.0, 1.875, 3.625, 5.375, 7.125])


def test_one_sided_weights_mirror_the_other_side_and_uniform_init():
    book = initial_codebook(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), 2)[0]
    assert book[1] == 0 and book[0] < 0 and (book[2:] > 0).all()
    uniform = initial_codebook(KNOWN, 2, init="uniform")[0].tolist()
    assert uniform == [-4.0, 0.0, 4.0, 8.0]


def test_one_ema_step_equals_the_formula_and_keeps_zero():
    q = CodebookWeightQuantizer(2, ema_decay=0.9)
    q.init_from(KNOWN)
    # assignment by midpoints -1.25, 1.375, 4.5: {-4,-3,-2} -> -2.5, {-1, 1} -> 0, {2,3,4} -> 2.75, {5..8} -> 6.25
    q.ema_update(KNOWN)
    expected = [0.9 * -2.5 + 0.1 * -3.0, 0.0, 0.9 * 2.75 + 0.1 * 3.0, 0.9 * 6.25 + 0.1 * 6.5]
    assert q.codebook[0].tolist() == pytest.approx(expected)
    assert q.codebook[0, 1].item() == 0.0 and int(q.num_updates) == 1


def test_empty_level_is_left_unchanged():
    q = CodebookWeightQuantizer(2, ema_decay=0.5)
    q.codebook.copy_(torch.tensor([[-2.5, 0.0, 2.75, 100.0]]))
    q.ema_update(KNOWN)  # nothing is nearer to 100 than to 2.75
    assert q.codebook[0, 3].item() == 100.0
    assert q.codebook[0, 2].item() == pytest.approx(0.5 * 2.75 + 0.5 * 5.0)  # 2..8 now all go to 2.75


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_forward_values_are_codebook_members(granularity, bits):
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    q = make_weight_quantizer(ADQConfig(weight_bits=bits, granularity=granularity), bits, w.shape)
    q.init_from(w)
    out = q(w)
    rows = out.reshape(q.codebook.shape[0], -1)
    for r, row in enumerate(rows):
        assert set(row.unique().tolist()) <= set(q.codebook[r].tolist())
        assert row.unique().numel() <= 2**bits
    assert (q.codebook == 0).sum(dim=1).eq(1).all()


def test_straight_through_gradient_and_exact_values():
    w = torch.randn(6, 10, requires_grad=True)
    q = CodebookWeightQuantizer(2)
    q.init_from(w.detach())
    out = q(w)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    assert torch.equal(out.detach(), q.decode(q.encode(w)))  # bit-exact codebook values


def test_ema_runs_once_per_optimizer_step_and_never_in_eval():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 16))
    q = CodebookWeightQuantizer(2, ema_decay=0.5)
    q.init_from(w.detach())
    opt = torch.optim.SGD([w], lr=0.5)
    q.train()
    q(w).pow(2).sum().backward()
    assert int(q.num_updates) == 0  # weights unchanged since initialisation
    opt.step()
    before = q.codebook.clone()
    q(w)
    q(w)  # a second forward on the same weights (gradient accumulation) does not update again
    assert int(q.num_updates) == 1 and not torch.equal(before, q.codebook)
    q.eval()
    opt.step()
    q(w)
    assert int(q.num_updates) == 1
    static = CodebookWeightQuantizer(2, adapt=False)
    static.init_from(w.detach())
    static.train()
    w.data.add_(1.0)
    static(w)
    assert int(static.num_updates) == 0


def test_update_interval_counts_optimizer_steps():
    w = nn.Parameter(torch.randn(4, 16))
    q = CodebookWeightQuantizer(2, update_interval=3)
    q.init_from(w.detach())
    q.train()
    for _ in range(6):
        with torch.no_grad():
            w.add_(0.01)
        with torch.enable_grad():
            q(w)
    assert int(q.num_steps) == 6 and int(q.num_updates) == 2


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
def test_n2uq_backward_equals_autograd_reference(bits, signed):
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
    assert all(g.abs().sum() > 0 for g in grads[0][1:])  # gradients reach x, start, intervals, scale


def test_n2uq_signedness_range_and_uniform_init():
    torch.manual_seed(0)
    relu_x = torch.randn(1000).relu() + 1e-3
    q = N2UQActivationQuantizer(2)
    y = q(relu_x)
    assert not bool(q.signed)
    ints = y / q.scale
    assert torch.allclose(ints, ints.round(), atol=1e-5) and ints.min() >= 0 and ints.max() <= 3
    step = q.scale.item()
    assert torch.allclose(y, torch.clamp(torch.round(relu_x / step), 0, 3) * step)  # starts as uniform
    s = N2UQActivationQuantizer(3)
    ys = s(torch.randn(1000))
    assert bool(s.signed)
    ints = ys / s.scale
    assert ints.min() >= -4 and ints.max() <= 3 and torch.allclose(ints, ints.round(), atol=1e-5)
    assert s(torch.zeros(3)).abs().max() == 0  # zero maps to zero at initialisation


def test_n2uq_thresholds_stay_sorted_after_a_large_step():
    q = N2UQActivationQuantizer(2)
    q(torch.rand(100))
    opt = torch.optim.SGD(q.parameters(), lr=100.0)
    q.raw_intervals.grad = torch.tensor([1.0, -1.0, 1.0])
    q.start.grad, q.scale.grad = torch.zeros(()), torch.zeros(())
    opt.step()
    assert (q.raw_intervals < 0).any()  # the raw values crossed zero...
    t = q.thresholds()
    assert (t[1:] > t[:-1]).all()  # ...the thresholds are still sorted


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_lsq_weight_grid_and_gradients(granularity):
    torch.manual_seed(0)
    w = torch.randn(6, 20, requires_grad=True)
    q = make_weight_quantizer(ADQConfig(weight_quantizer="lsq", granularity=granularity), 3, w.shape)
    assert isinstance(q, LSQWeightQuantizer)
    q.init_from(w.detach())
    out = q(w)
    ints = out.reshape(q.step.shape[0], -1) / q.step
    assert torch.allclose(ints, ints.round(), atol=1e-5) and ints.min() >= -4 and ints.max() <= 3
    out.pow(2).sum().backward()
    assert w.grad.abs().sum() > 0 and q.step.grad.abs().sum() > 0


def test_lsq_activation_grid_and_gradients():
    q = LSQActivationQuantizer(4)
    x = torch.randn(64, requires_grad=True)
    y = q(x)
    assert bool(q.signed)
    ints = y / q.step
    assert torch.allclose(ints, ints.round(), atol=1e-5) and ints.min() >= -8 and ints.max() <= 7
    y.pow(2).sum().backward()
    assert x.grad.abs().sum() > 0 and q.step.grad.abs() > 0


@pytest.mark.parametrize(
    "config",
    [ADQConfig(weight_bits=3), ADQConfig(weight_bits=3, granularity="per_channel"),
     ADQConfig(weight_bits=3, weight_quantizer="lsq", granularity="per_channel")],
)
def test_encode_decode_equals_forward(config):
    w = torch.randn(5, 3, 3, 3)
    q = make_weight_quantizer(config, 3, w.shape)
    q.init_from(w)
    codes = q.encode(w)
    assert codes.dtype == torch.int64 and codes.min() >= 0 and codes.max() < 8
    assert torch.equal(q.decode(codes), q(w).detach())


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [1, 7, 13, 1000])
def test_pack_round_trip(bits, n):
    codes = torch.randint(0, 2**bits, (n,))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(n, bits) == math.ceil(n * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_pack_bit_order_by_hand():
    # LSB-first stream: 1=01, 2=10, 3=11, 0=00 -> byte 0 = 0b00_11_10_01 = 0x39; then 1 -> 0x01
    assert pack_codes(torch.tensor([1, 2, 3, 0, 1]), 2).tolist() == [0x39, 0x01]
    assert pack_codes(torch.tensor([5, 3]), 3).tolist() == [0b00011101]


def test_pack_errors():
    with pytest.raises(ValueError, match="codes must lie"):
        pack_codes(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="bytes"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 2, 20)
