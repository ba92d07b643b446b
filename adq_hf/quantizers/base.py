"""The small interface every quantizer implements, and the name registry.

Quantized layers (``adq_hf.nn``) only talk to this interface, so a new method is one new file
plus one ``register_*_quantizer`` call; nothing else in the package changes.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, List, Optional, Tuple, Type

import torch
from torch import nn


class WeightQuantizer(nn.Module):
    """Maps a float weight tensor to a fake-quantized one with at most ``2**bits`` values per group.

    Subclasses implement:
      * ``init_from(weight)``: set the quantizer's state (levels, steps) from float weights;
      * ``forward(weight)``: fake-quantized weight, straight-through (or learned) gradients;
      * ``encode(weight)``: integer codes in ``[0, 2**bits)`` (int64, same shape as ``weight``);
      * ``decode(codes)``: float weight from codes, equal to ``forward(weight)`` in value.
    ``decode(encode(w))`` is what a packed checkpoint stores, so it must equal ``forward(w)``.
    """

    def __init__(self, bits: int):
        super().__init__()
        self.bits = int(bits)

    @property
    def num_levels(self) -> int:
        return 2 ** self.bits

    def init_from(self, weight: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def encode(self, weight: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def levels(self) -> torch.Tensor:
        """The values codes decode to, ``[groups, 2**bits]`` (a look-up table per group)."""
        raise NotImplementedError  # pragma: no cover - interface

    # Buffers stored at another precision by design (the codebook's fp16 group scales): ``state_in_float32``
    # keeps them there.
    stored_dtypes: Dict[str, torch.dtype] = {}

    def state_in_float32(self) -> "WeightQuantizer":
        """Every floating tensor of the quantizer in float32 whatever the default dtype the model was
        built under (bf16/fp16 models: docs/methods.md, "Half precision"), but ``stored_dtypes``."""
        self.float()
        for name, dtype in self.stored_dtypes.items():
            if self._buffers.get(name) is not None:
                self._buffers[name] = self._buffers[name].to(dtype)
        return self

    def table_bytes(self) -> int:
        """Bytes of the floating-point state the tables are built from (codebooks, scales, steps) at
        the dtype it is stored in: what a checkpoint keeps next to the packed codes, and what average
        bits per weight must include (a group's table or scale is not free)."""
        state = list(self.parameters()) + list(self.buffers())
        return sum(t.numel() * t.element_size() for t in state if t.is_floating_point())

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class ActivationQuantizer(nn.Module):
    """Fake-quantizes a layer's input to ``2**bits`` uniform integer levels times a step.

    Calibration (``adq_hf.calibrate_activations`` drives it): :meth:`observe` collects statistics of
    several batches, :meth:`finish_calibration` turns them into the signedness and the step with the
    quantizer's ``range_estimator`` (:data:`RANGE_ESTIMATORS`, set from ``ADQConfig.activation_init``)
    and sets the ``initialized`` buffer. A quantizer that was never calibrated does this on its first
    forward (``init_from(x)``: one batch); under DDP calibrate before wrapping so every rank starts
    from the same values. Subclasses implement ``set_step(step)``: their parameters for a uniform
    quantizer of that step (the signedness is set before it is called).
    """

    def __init__(self, bits: int):
        super().__init__()
        self.bits = int(bits)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        # Signed (inputs that can be negative) or unsigned (after ReLU): decided by the calibration data.
        self.register_buffer("signed", torch.zeros((), dtype=torch.bool))
        self.range_estimator = DEFAULT_RANGE_ESTIMATOR
        self._observer: Optional[RangeObserver] = None

    def int_range(self) -> Tuple[int, int]:
        """Integer levels ``(qmin, qmax)``: signed ``[-2**(b-1), 2**(b-1)-1]``, unsigned ``[0, 2**b-1]``."""
        return (-(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1) if bool(self.signed) else (0, 2**self.bits - 1)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Add one calibration batch's statistics (nothing is quantized or changed yet)."""
        if self._observer is None:
            self._observer = RangeObserver()
        self._observer.update(x)

    @property
    def observed_batches(self) -> int:
        return 0 if self._observer is None else self._observer.batches

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Set signedness and step from the observed batches (:meth:`observe`) and mark the quantizer
        initialised; the statistics are dropped."""
        observer, self._observer = self._observer, None
        if observer is None or observer.count == 0:
            raise RuntimeError(f"{type(self).__name__}.finish_calibration() without observed data: call observe(x) "
                               "with at least one calibration batch first.")
        self.signed.fill_(observer.min < 0)
        qmin, qmax = self.int_range()
        self.set_step(estimate_step(observer, qmin, qmax, self.range_estimator))
        self.initialized.fill_(True)

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """Calibrate on one batch (what the first forward of an uncalibrated quantizer does)."""
        self._observer = None
        self.observe(x)
        self.finish_calibration()

    def set_step(self, step: float) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={bool(self.signed)}, initialized={bool(self.initialized)}"


# How a calibrated step is chosen from the observed inputs (docs/methods.md, "Activation ranges"):
#   "mse": the step minimising the mean squared quantization error of the observed inputs;
#   "percentile": the PERCENTILE-th percentile of |x| is the largest level;
#   "minmax": the largest |x| seen is the largest level (nothing clipped);
#   "mean": LSQ's ``2 mean|x| / sqrt(Qp)`` (adq_hf's only initialisation before issue 16).
RANGE_ESTIMATORS = ("mse", "percentile", "minmax", "mean")
DEFAULT_RANGE_ESTIMATOR = "mse"
PERCENTILE = 99.99
SAMPLES_PER_BATCH = 2**13  # inputs kept per batch for the MSE / percentile estimates (random, fixed seed)
MAX_SAMPLES = 2**16  # past this the kept samples are halved (every batch keeps the same weight)
MIN_STEP = 1e-8
_MSE_GRID = 48  # candidate steps per search round (two rounds: coarse over 2**-12..1 of the min-max step, then fine)


class RangeObserver:
    """Statistics of a quantizer's inputs over calibration batches: exact count, sum of ``|x|``, min and
    max, and a uniform random sample of the values (fixed-seed generator: the same on every run and
    rank) for the estimates that need the distribution (MSE, percentile)."""

    def __init__(self, seed: int = 0):
        self.count = 0
        self.batches = 0
        self.abs_sum = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.per_batch = SAMPLES_PER_BATCH
        self.samples: List[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        if flat.numel() == 0:
            return
        self.count += flat.numel()
        self.batches += 1
        self.abs_sum += float(flat.abs().sum(dtype=torch.float64))
        self.min = min(self.min, float(flat.min()))
        self.max = max(self.max, float(flat.max()))
        if flat.numel() > self.per_batch:
            index = torch.randint(flat.numel(), (self.per_batch,), generator=self.generator).to(flat.device)
            flat = flat[index]
        self.samples.append(flat.cpu())
        if sum(s.numel() for s in self.samples) > MAX_SAMPLES:
            self.samples = [s[torch.randperm(s.numel(), generator=self.generator)[: s.numel() // 2]] for s in self.samples]
            self.per_batch = max(self.per_batch // 2, 1)

    def sample(self) -> torch.Tensor:
        """The kept values plus the exact extremes (so a clipping range is never judged without them)."""
        return torch.cat(self.samples + [torch.tensor([self.min, self.max])])

    @property
    def abs_mean(self) -> float:
        return self.abs_sum / max(self.count, 1)


def uniform_quantize(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(x / step), qmin, qmax) * step``; ``step`` broadcasts (a column of candidates)."""
    return torch.clamp(torch.round(x / step), qmin, qmax) * step


def _mse_step(x: torch.Tensor, qmin: int, qmax: int, largest: float) -> float:
    """Grid search for the step with the least squared error on ``x``: a geometric grid from
    ``largest * 2**-12`` to ``largest`` (the min-max step), then a finer one around its best point."""
    def best(candidates):
        errors = torch.stack([(uniform_quantize(x, s, qmin, qmax) - x).pow(2).sum() for s in candidates])
        i = int(errors.argmin())
        return candidates, i

    log_hi = math.log(largest)
    coarse, i = best(torch.exp(torch.linspace(log_hi - 12 * math.log(2), log_hi, _MSE_GRID)))
    lo, hi = coarse[max(i - 1, 0)], coarse[min(i + 1, len(coarse) - 1)]
    fine, j = best(torch.exp(torch.linspace(math.log(lo), math.log(hi), _MSE_GRID)))
    return float(fine[j])


def estimate_step(observer: RangeObserver, qmin: int, qmax: int, estimator: str) -> float:
    """The step of a ``[qmin, qmax]`` uniform quantizer for the observed inputs (:data:`RANGE_ESTIMATORS`)."""
    if estimator == "mean":
        step = 2 * observer.abs_mean / math.sqrt(qmax)
    else:
        # the step at which the observed extremes are the end levels (no clipping)
        minmax = max(observer.max / qmax, observer.min / qmin if qmin < 0 else 0.0, 0.0)
        if estimator == "minmax" or minmax <= MIN_STEP:
            step = minmax
        elif estimator == "percentile":
            step = float(torch.quantile(observer.sample().abs(), PERCENTILE / 100)) / qmax
        elif estimator == "mse":
            step = _mse_step(observer.sample(), qmin, qmax, minmax)
        else:
            raise ValueError(f"range estimator {estimator!r} is invalid: expected one of {RANGE_ESTIMATORS}.")
    return max(step, MIN_STEP)


WEIGHT_QUANTIZERS: Dict[str, Type[WeightQuantizer]] = {}
ACTIVATION_QUANTIZERS: Dict[str, Type[ActivationQuantizer]] = {}


def register_weight_quantizer(name: str) -> Callable[[Type[WeightQuantizer]], Type[WeightQuantizer]]:
    def wrap(cls):
        WEIGHT_QUANTIZERS[name] = cls
        return cls

    return wrap


def register_activation_quantizer(name: str) -> Callable[[Type[ActivationQuantizer]], Type[ActivationQuantizer]]:
    def wrap(cls):
        ACTIVATION_QUANTIZERS[name] = cls
        return cls

    return wrap


def weight_groups(config, weight_shape) -> int:
    """How many contiguous groups of the row-major flattened weight get their own table (step,
    codebook or scale), from ``config.granularity``: 1 (``per_tensor``), the output channels
    (``per_channel``), or ``rows * cols / group_size`` (``per_group``: group ``g`` holds columns
    ``[(g % (cols / G)) * G, ...+ G)`` of row ``g // (cols / G)``; ``cols`` is everything but the output
    dimension, ``in * kh * kw`` for a convolution). A weight whose ``cols`` is not a multiple of
    ``group_size`` gets one group per output channel instead (docs/methods.md), with a warning."""
    rows = int(weight_shape[0])
    cols = math.prod(int(d) for d in weight_shape[1:])
    if config.granularity == "per_tensor":
        return 1
    if config.granularity == "per_channel":
        return rows
    size = config.group_size
    if cols % size:
        warnings.warn(f"adq_hf: a weight of shape {list(weight_shape)} has {cols} columns, not a multiple of "
                      f"group_size={size}: it gets one group per output channel (groups of {cols}).", stacklevel=3)
        return rows
    return rows * (cols // size)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward (exactly), identity backward."""
    return straight_through(torch.round(x), x)


def straight_through(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """Exactly ``value`` in the forward pass, the gradient of ``surrogate`` in the backward pass.

    ``value + (surrogate - surrogate.detach())`` adds an exact zero, so a quantized value stays
    bit-identical (``surrogate + (value - surrogate).detach()`` would round), which makes a reloaded
    checkpoint reproduce outputs exactly.
    """
    return value.detach() + (surrogate - surrogate.detach())


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward, gradient multiplied by ``scale`` (LSQ's step-size gradient scaling)."""
    return straight_through(x, x * scale)
