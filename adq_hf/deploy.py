"""Deploy mode: packed codes and look-up tables in memory, decoded on the fly (docs/deploy.md).

``convert_for_inference(model)`` turns every quantized layer of a fake-quant model, in place, into
its deployed class (``__class__`` swap, as ``adq_hf.nn`` does, so names, hooks and the state-dict
layout are kept):

* ``layer._buffers["weight"]``: the packed b-bit codes, uint8, exactly the checkpoint's
  ``<layer>.weight`` tensor (docs/format.md), so ``model.state_dict()`` *is* the packed checkpoint
  and ``adq_hf.save_pretrained`` / ``model.save_pretrained`` write the same file as before converting;
* ``layer.weight_quantizer``: kept only as the holder of the look-up table, ``levels()``
  ``[groups, 2**b]`` (the ADQ codebook itself; LSQ's step / POST's alpha, from which ``levels()``
  is a ``[groups, 2**b]`` product); its training state is frozen;
* ``layer.bias`` and ``layer.input_quantizer`` (eval-mode behaviour), unchanged;
* the float latent weight is deleted.

``layer.weight`` reads as the decoded weight (unpack codes, gather from the table, reshape), so
timm's forward-overriding convs (``Conv2dSame``, ``StdConv2d``...) run their own forward on it, as
their fake-quant classes do. Outputs equal the fake-quant model's eval outputs bit for bit.

A deployed model refuses training: ``.train()`` and a backward pass raise ``RuntimeError``.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .nn import QuantizedLayerMixin, _QuantizedWeightAttribute, quantized_layers
from .packing import pack_codes, packed_size, unpack_stream

__all__ = [
    "DeployedConv2d",
    "DeployedLinear",
    "OnnxMismatchError",
    "TrainingRefusedError",
    "convert_for_inference",
    "convert_for_loading",
    "export_onnx",
    "is_deployed",
    "memory_report",
    "resident_bytes",
    "set_weight_cache",
]

_FIX = ("load the fake-quant model for training (timm.create_model(...) without deploy=True, "
        "AutoModel.from_pretrained(...) without adq_hf.convert_for_inference).")


class TrainingRefusedError(RuntimeError):
    """A deployed (inference-only) model was asked to train."""


class OnnxMismatchError(RuntimeError):
    """onnxruntime's output of an exported file does not match PyTorch's."""


def _refusal(what: str) -> str:
    return (f"{what}: this model is in adq_hf deploy mode (adq_hf.convert_for_inference): its quantized layers hold "
            f"only packed codes and look-up tables, no float weights to train; {_FIX}")


# ---------------------------------------------------------------------------------------------------------------
# Decoding: packed codes -> table look-up -> weight
# ---------------------------------------------------------------------------------------------------------------

def lut_decode(packed: torch.Tensor, table: torch.Tensor, bits: int, shape: Tuple[int, ...]) -> torch.Tensor:
    """The weight ``table[g, code]`` of every element, ``shape``; group ``g`` owns a contiguous slice."""
    codes = unpack_stream(packed, bits, math.prod(shape))
    return torch.gather(table, 1, codes.reshape(table.shape[0], -1)).reshape(shape)


@torch.library.custom_op("adq_hf::lut_decode", mutates_args=())
def lut_decode_op(packed: torch.Tensor, table: torch.Tensor, bits: int, shape: List[int]) -> torch.Tensor:
    """:func:`lut_decode` as one operator: how ONNX export sees a layer's weight (``_onnx_lut_decode``)."""
    return lut_decode(packed, table, bits, tuple(shape))


@lut_decode_op.register_fake
def _(packed, table, bits, shape):
    return table.new_empty(shape)


class _RefuseBackward(torch.autograd.Function):
    """Identity forward; a backward pass through a deployed layer raises."""

    @staticmethod
    def forward(ctx, out, sentinel):
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        raise TrainingRefusedError(_refusal("backward()"))


# Makes every deployed output part of the autograd graph when grad mode is on, so that any backward
# pass reaches _RefuseBackward (even when no parameter before it requires a gradient).
_SENTINEL = torch.zeros((), requires_grad=True)


# ---------------------------------------------------------------------------------------------------------------
# Input quantizers in deploy form
# ---------------------------------------------------------------------------------------------------------------

MAX_THRESHOLD_STEPS = 4096


@torch.no_grad()
def n2uq_thresholds(quantizer) -> Optional[torch.Tensor]:
    """The exact float32 thresholds of an N2UQ quantizer's eval forward: its output is
    ``scale * (zero_point + #{thresholds <= x})`` for every float32 ``x``, bit for bit.

    N2UQ finds the interval ``j`` of ``x`` (edges ``L``, widths ``d``) and adds one level when
    ``(x - L_j) / d_j >= 0.5``. In float32 that test is monotone in ``x``, so it switches at one float
    ``t_j`` in ``(L_j, L_{j+1}]``, found here by stepping one float at a time from the computed
    midpoint with the same float32 operations. Then ``j + [x >= t_j]`` is the number of ``t`` not
    above ``x``: a few comparisons (or one ``searchsorted``) instead of a search, two gathers and a
    division. ``None`` if a threshold is not found within ``MAX_THRESHOLD_STEPS`` floats or falls
    outside its interval (the quantizer's own forward is used then).
    """
    d = quantizer.intervals().detach().float()
    start = quantizer.start.detach().float()
    lower = torch.cat([start.reshape(1), start + torch.cumsum(d, 0)[:-1]])  # as in _N2UQFunction.forward

    def passes(x):
        return (x - lower) / d >= 0.5

    t = lower + d / 2
    below, above = torch.full_like(t, -math.inf), torch.full_like(t, math.inf)
    for _ in range(MAX_THRESHOLD_STEPS):
        prev = torch.nextafter(t, below)
        ok, ok_prev = passes(t), passes(prev)
        if bool((ok & ~ok_prev).all()):
            # the count equals j + [x >= t_j] only if each t_j lies in its interval: not so when a width
            # is below the float spacing of its edge (an empty interval); then keep the quantizer's forward
            return t.contiguous() if bool((t[:-1] <= lower[1:]).all()) else None
        t = torch.where(~ok, torch.nextafter(t, above), torch.where(ok_prev, prev, t))
    return None


# Up to this many thresholds (4-bit inputs), counting them one comparison at a time is faster than
# searchsorted (measured on 1x16x28x28 inputs at batch 64: 2.8 vs 6.3 ms for 3, 13.8 vs 16.0 ms for 15).
COMPARE_MAX_THRESHOLDS = 15


def _n2uq_form(layer, x: torch.Tensor) -> torch.Tensor:
    thresholds = layer._buffers["input_thresholds"]
    if thresholds.numel() <= COMPARE_MAX_THRESHOLDS:
        count = (x >= thresholds[0]).to(x.dtype)
        for k in range(1, thresholds.numel()):
            count = count + (x >= thresholds[k]).to(x.dtype)
    elif layer.__dict__.get("_exporting"):  # ONNX has no searchsorted
        count = (x.unsqueeze(-1) >= thresholds).sum(dim=-1).to(x.dtype)
    else:
        count = torch.searchsorted(thresholds, x.contiguous(), right=True).to(x.dtype)
    return layer.input_quantizer.scale * (count + layer.__dict__["_input_zero_point"])


def _lsq_form(layer, x: torch.Tensor) -> torch.Tensor:
    quantizer = layer.input_quantizer
    qmin, qmax = layer.__dict__["_input_range"]
    step = quantizer.step
    multiplier = getattr(quantizer, "multiplier", None)  # LSQ subclasses that scale the step per input (ASQ)
    if multiplier is not None:
        step = step * multiplier(x)
    return torch.clamp(torch.round(x / step), qmin, qmax) * step


def input_form(layer):
    """The deploy form of a layer's (calibrated) input quantizer: a function ``(layer, x) -> x_q``
    equal to the quantizer's eval forward, with its data-dependent branches (calibration,
    signedness) resolved now and in ops ONNX has. ``None`` when there is none (not calibrated yet,
    another quantizer type): the quantizer's own forward runs."""
    from .quantizers import LSQActivationQuantizer, N2UQActivationQuantizer

    quantizer = layer.input_quantizer
    if quantizer is None or not bool(quantizer.initialized):
        return None
    if type(quantizer) is N2UQActivationQuantizer:
        thresholds = n2uq_thresholds(quantizer)
        if thresholds is None:
            return None
        layer._buffers["input_thresholds"] = thresholds.to(quantizer.scale.device)
        layer.__dict__["_input_zero_point"] = quantizer.zero_point
        return _n2uq_form
    if isinstance(quantizer, LSQActivationQuantizer):
        layer.__dict__["_input_range"] = quantizer.int_range()
        return _lsq_form
    return None


# ---------------------------------------------------------------------------------------------------------------
# Deployed layers
# ---------------------------------------------------------------------------------------------------------------

class DeployedLayerMixin(QuantizedLayerMixin):
    """Packed codes in ``_buffers["weight"]``, the table in ``weight_quantizer.levels()``.

    Attributes set by :func:`deploy_layer`: ``weight_shape``, ``weight_dtype`` (the float weight's).
    ``decoded_weight`` (a non-persistent buffer) holds the decoded weight when the layer is cached
    (:func:`set_weight_cache`).
    """

    is_deployed = True
    weight_shape: Tuple[int, ...]
    weight_dtype: torch.dtype

    @property
    def packed_weight(self) -> torch.Tensor:
        return self._buffers["weight"]

    @property
    def weight(self) -> torch.Tensor:
        return self.quantized_weight()

    @property
    def weight_numel(self) -> int:
        return math.prod(self.weight_shape)

    def latent_weight(self) -> torch.Tensor:
        raise TrainingRefusedError(_refusal("latent_weight()"))

    def table(self) -> torch.Tensor:
        """The look-up table ``[groups, 2**bits]`` in the float weight's dtype."""
        return self.weight_quantizer.levels().to(self.weight_dtype)

    def decode_weight(self) -> torch.Tensor:
        if self.__dict__.get("_exporting"):  # one operator, which export_onnx translates (_onnx_lut_decode)
            return lut_decode_op(self._buffers["weight"], self.table(), self.weight_bits, list(self.weight_shape))
        return lut_decode(self._buffers["weight"], self.table(), self.weight_bits, self.weight_shape)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input quantizer's eval-mode output, through its deploy form (:func:`input_form`)."""
        quantizer = self.input_quantizer
        if quantizer is None:
            return x
        form = self.__dict__.get("_input_form")
        if form is None or x.dtype != torch.float32:
            if self.__dict__.get("_exporting"):
                raise NotImplementedError(f"ONNX export has no form for {type(quantizer).__name__} here: it must be a "
                                          "calibrated n2uq or lsq quantizer on float32 inputs.")
            out = quantizer(x)  # uncalibrated (it initialises now), another dtype, or a quantizer without a form
            if form is None and bool(quantizer.initialized):
                self.prepare_input_form()  # calibrated by this call: use the deploy form from now on
            return out
        return form(self, x)

    def prepare_input_form(self) -> None:
        """(Re)build the input quantizer's deploy form from its current state (after loading, calibrating)."""
        self._buffers["input_thresholds"] = None
        self.__dict__["_input_form"] = input_form(self)

    def quantized_weight(self) -> torch.Tensor:
        cached = self._buffers.get("decoded_weight")
        return cached if cached is not None else self.decode_weight()

    def set_packed_codes(self, packed: torch.Tensor) -> None:
        """Replace the codes (a checkpoint's ``<layer>.weight``); refreshes the cache if there is one."""
        expected = packed_size(math.prod(self.weight_shape), self.weight_bits)
        if packed.dtype != torch.uint8 or packed.shape != (expected,):
            raise ValueError(f"packed codes must be uint8 [{expected}], got {packed.dtype} {list(packed.shape)}.")
        self._buffers["weight"] = packed.to(self._buffers["weight"].device)
        self._refresh_cache()

    def _refresh_cache(self) -> None:
        if self._buffers.get("decoded_weight") is not None:
            self._buffers["decoded_weight"] = None
            self._buffers["decoded_weight"] = self.decode_weight()

    def _guard(self, out: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return _RefuseBackward.apply(out, _SENTINEL)
        return out

    def _apply(self, fn, recurse=True):
        # .half() / .to(dtype) convert float tensors: the decoded weight follows, as the latent weight would
        self.weight_dtype = fn(torch.empty(0, dtype=self.weight_dtype)).dtype
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        if mode:
            raise TrainingRefusedError(_refusal("train()") + " Call model.eval() to keep using it for inference.")
        return super().train(False)

    def extra_repr(self) -> str:
        cached = ", cached" if self._buffers.get("decoded_weight") is not None else ""
        return f"{super().extra_repr()}, deployed: {self.weight_bits}-bit codes {list(self.weight_shape)}{cached}"


class DeployedLinear(DeployedLayerMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._guard(F.linear(self.quantize_input(x), self.quantized_weight(), self.bias))


class DeployedConv2d(DeployedLayerMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._guard(self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias))


class _DeployedOwnForward(DeployedLayerMixin):
    """timm's forward-overriding convs: their own forward reads ``self.weight`` (the decoded weight)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._guard(super().forward(self.quantize_input(x)))


_DEPLOYED_CLASSES: Dict[type, type] = {}


def _float_class(quant_cls: type) -> type:
    """The float layer class a quantized class was made from (``QuantStdConv2d`` -> ``StdConv2d``)."""
    return next(c for c in quant_cls.__mro__ if issubclass(c, (nn.Linear, nn.Conv2d)) and not issubclass(c, QuantizedLayerMixin))


def deployed_class_for(quant_cls: type) -> type:
    """The deployed class of a quantized layer class (made once, importable from this module)."""
    if quant_cls in _DEPLOYED_CLASSES:
        return _DEPLOYED_CLASSES[quant_cls]
    float_cls = _float_class(quant_cls)
    if issubclass(quant_cls, _QuantizedWeightAttribute):
        bases = (_DeployedOwnForward, float_cls)
    else:
        base = DeployedLinear if issubclass(float_cls, nn.Linear) else DeployedConv2d
        bases = (base,) if float_cls in (nn.Linear, nn.Conv2d) else (base, float_cls)
    if len(bases) == 1:
        cls = bases[0]
    else:
        name = f"Deployed{float_cls.__name__}"
        if name in globals():  # timm.layers.Linear is also called "Linear"
            name = f"Deployed{float_cls.__module__.replace('.', '_')}_{float_cls.__name__}"
        cls = type(name, bases, {"__module__": __name__})
        globals()[name] = cls
    _DEPLOYED_CLASSES[quant_cls] = cls
    return cls


def is_deployed(module: nn.Module) -> bool:
    """A deployed layer, or a model with at least one deployed layer."""
    if isinstance(module, DeployedLayerMixin):
        return True
    return any(isinstance(m, DeployedLayerMixin) for m in module.modules())


@torch.no_grad()
def deploy_layer(layer: nn.Module, packed: Optional[torch.Tensor] = None) -> nn.Module:
    """Convert one fake-quant layer in place. ``packed``: its codes when they are known already (a
    checkpoint being loaded); otherwise they are encoded from the latent weight."""
    if isinstance(layer, DeployedLayerMixin):
        return layer
    if not isinstance(layer, QuantizedLayerMixin):
        raise TypeError(f"{type(layer).__name__} is not an adq_hf quantized layer.")
    weight = layer.latent_weight()
    shape, dtype = tuple(weight.shape), weight.dtype
    if packed is None:
        packed = pack_codes(layer.weight_quantizer.encode(weight), layer.weight_bits)
    cls = deployed_class_for(type(layer))
    del layer._parameters["weight"]
    layer.__class__ = cls
    layer._buffers["weight"] = packed.to(weight.device)
    layer.weight_shape, layer.weight_dtype = shape, dtype
    for name in ("decoded_weight", "input_thresholds"):  # derived state: not in the checkpoint
        layer._buffers[name] = None
        layer._non_persistent_buffers_set.add(name)
    layer.prepare_input_form()
    for param in layer.parameters():
        param.requires_grad_(False)
    # loading a state dict (codes, codebooks, thresholds) must refresh the derived state
    layer.register_load_state_dict_post_hook(_refresh_after_load)
    layer.eval()
    return layer


def _refresh_after_load(layer: nn.Module, _incompatible_keys) -> None:
    layer._refresh_cache()
    layer.prepare_input_form()


def deployed_layers(model: nn.Module):
    return [(n, m) for n, m in quantized_layers(model) if isinstance(m, DeployedLayerMixin)]


@torch.no_grad()
def set_weight_cache(model: nn.Module, max_bytes: Optional[float]) -> int:
    """Keep decoded weights of deployed layers, in module order, while their total stays within
    ``max_bytes`` (``None``: every layer; ``0``: none, decode at every call). Returns the bytes cached."""
    total = 0
    for _, layer in deployed_layers(model):
        layer._buffers["decoded_weight"] = None
        nbytes = math.prod(layer.weight_shape) * torch.empty((), dtype=layer.weight_dtype).element_size()
        if max_bytes is None or total + nbytes <= max_bytes:
            layer._buffers["decoded_weight"] = layer.decode_weight()
            total += nbytes
    return total


def convert_for_inference(
    model: nn.Module, cache_bytes: Optional[float] = 0, compile: bool = False, **compile_kwargs: Any
) -> nn.Module:
    """Convert a quantized (fake-quant) model for inference, in place; returns it.

    Every quantized layer keeps its packed codes, look-up table, bias and input quantizer; the float
    latent weights are freed. ``cache_bytes``: memory budget for decoded weights kept between calls
    (default 0: weights are decoded at every call and resident memory stays at the information limit;
    ``None``: cache every layer: no decoding cost, fp32 weight memory). ``compile=True`` also compiles the model in
    place with ``torch.compile`` (``compile_kwargs`` go to it; run it under ``torch.no_grad()``).
    The measured trade-offs are in docs/deploy.md.
    """
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no adq_hf quantized layer: quantize it (adq_hf.quantize_model, "
                         "quantization_config=...) or load an adq_hf checkpoint before convert_for_inference.")
    uncalibrated = [n for n, m in layers if m.input_quantizer is not None and not bool(m.input_quantizer.initialized)]
    if uncalibrated:
        warnings.warn(f"{len(uncalibrated)} input quantizers are not calibrated (e.g. {uncalibrated[0]}): they will be "
                      "initialised from the first inference batch. Run adq_hf.calibrate_activations first.", stacklevel=2)
    model.eval()
    for _, layer in layers:
        deploy_layer(layer)
    set_weight_cache(model, cache_bytes)
    if compile:
        model.compile(**compile_kwargs)
    return model


@torch.no_grad()
def convert_for_loading(model: nn.Module) -> nn.Module:
    """Deploy mode for a quantized model whose weights are not loaded yet: every quantized layer gets
    zero codes (nothing is encoded) and frees its float weight; a checkpoint is loaded next
    (``adq_hf.serialization.load_file``), which also fills the tables. timm's ``deploy=True`` uses it."""
    for _, layer in quantized_layers(model):
        if not isinstance(layer, DeployedLayerMixin):
            weight = layer.latent_weight()
            deploy_layer(layer, torch.zeros(packed_size(weight.numel(), layer.weight_bits), dtype=torch.uint8))
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------

def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def resident_bytes(module: nn.Module) -> int:
    """Bytes of all tensors a module holds (parameters and buffers, persistent or not, including
    cached decoded weights), each storage counted once."""
    return _unique_bytes(list(module.parameters()) + list(module.buffers()))


def memory_report(model: nn.Module) -> Dict[str, int]:
    """Resident memory of a quantized model (fake-quant or deployed) against the information limit.

    ``quantized_weight_bytes``: what the quantized layers' weights occupy (deployed: packed codes,
    tables and quantizer state, plus cached decoded weights; fake-quant: the float latent weight and
    quantizer state); ``information_limit_bytes``: sum over quantized layers of ``params * bits / 8``
    plus the tables ``levels()``; ``fp32_weight_bytes``: the same weights in fp32;
    ``resident_bytes``: every tensor of the model.
    """
    weight_tensors, limit, fp32 = [], 0.0, 0
    for _, layer in quantized_layers(model):
        deployed = isinstance(layer, DeployedLayerMixin)
        numel = math.prod(layer.weight_shape if deployed else layer.latent_weight().shape)
        table = layer.weight_quantizer.levels()
        limit += numel * layer.weight_bits / 8 + table.numel() * table.element_size()
        fp32 += numel * 4
        weight_tensors.append(layer._buffers["weight"] if deployed else layer.latent_weight())
        weight_tensors.append(layer._buffers.get("decoded_weight"))
        weight_tensors.extend(layer.weight_quantizer.parameters())
        weight_tensors.extend(layer.weight_quantizer.buffers())
    return {
        "quantized_weight_bytes": _unique_bytes(weight_tensors),
        "information_limit_bytes": int(round(limit)),
        "fp32_weight_bytes": fp32,
        "resident_bytes": resident_bytes(model),
    }


# ---------------------------------------------------------------------------------------------------------------
# ONNX export
# ---------------------------------------------------------------------------------------------------------------

def _onnx_lut_decode(packed, table, bits: int, shape):
    """ONNX for ``adq_hf::lut_decode``: unpack the uint8 codes with BitShift/BitwiseAnd (uint8 when
    ``bits`` divides 8, else ``bits`` bytes joined into a uint64 word holding 8 codes), then
    ``GatherElements`` on the ``[groups, 2**bits]`` table and ``Reshape``."""
    import numpy as np
    import onnx_ir as ir
    from onnxscript import opset18 as op

    def ints(*values):
        return op.Constant(value_ints=list(values))

    numel, mask, nbytes = math.prod(shape), (1 << bits) - 1, packed_size(math.prod(shape), bits)
    if 8 % bits == 0:
        shifts = op.Constant(value=ir.tensor(np.arange(0, 8, bits, dtype=np.uint8).reshape(1, -1)))
        codes = op.BitShift(op.Unsqueeze(packed, ints(1)), shifts, direction="RIGHT")
        codes = op.BitwiseAnd(codes, op.Constant(value=ir.tensor(np.array(mask, dtype=np.uint8))))
    else:
        words = -(-nbytes // bits)
        columns = op.Cast(op.Reshape(op.Pad(packed, ints(0, words * bits - nbytes)), ints(words, bits)),
                          to=ir.DataType.UINT64)
        shifted = op.BitShift(columns, op.Constant(value=ir.tensor(8 * np.arange(bits, dtype=np.uint64).reshape(1, -1))),
                              direction="LEFT")
        word = op.Slice(shifted, ints(0), ints(1), ints(1))
        for j in range(1, bits):  # BitwiseOr, not ReduceSum: onnxruntime sums int64 inexactly past 2**53
            word = op.BitwiseOr(word, op.Slice(shifted, ints(j), ints(j + 1), ints(1)))
        shifts = op.Constant(value=ir.tensor(bits * np.arange(8, dtype=np.uint64).reshape(1, -1)))
        codes = op.BitShift(word, shifts, direction="RIGHT")
        codes = op.BitwiseAnd(codes, op.Constant(value=ir.tensor(np.array(mask, dtype=np.uint64))))
    codes = op.Slice(op.Reshape(codes, ints(-1)), ints(0), ints(numel))
    groups = table.shape[0]
    codes = op.Reshape(op.Cast(codes, to=ir.DataType.INT64), ints(groups, numel // groups))
    return op.Reshape(op.GatherElements(table, codes, axis=1), ints(*shape))


def _batch_of_two(value):
    """Example inputs with batch 1 repeated to batch 2: torch.export specialises size-1 dimensions."""
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == 1:
        return torch.cat([value, value])
    if isinstance(value, (tuple, list)):
        return type(value)(_batch_of_two(v) for v in value)
    if isinstance(value, dict):
        return {k: _batch_of_two(v) for k, v in value.items()}
    return value


def _batch_dynamic_shapes(args: tuple, kwargs: dict):
    """``dynamic_shapes`` for torch.export: dimension 0 (the batch) of every tensor input is dynamic."""
    def spec(value):
        return {0: torch.export.Dim.DYNAMIC} if torch.is_tensor(value) and value.dim() > 0 else None

    if kwargs:
        return {k: spec(v) for k, v in kwargs.items()}
    return tuple(spec(v) for v in args)


def _as_args(example_inputs) -> Tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _first_tensor(output) -> torch.Tensor:
    if torch.is_tensor(output):
        return output
    if isinstance(output, dict) or hasattr(output, "values"):
        output = list(output.values())
    return _first_tensor(output[0])


def export_onnx(
    model: nn.Module,
    example_inputs,
    path: str,
    dynamic_batch: bool = True,
    dynamic_shapes=None,
    opset_version: Optional[int] = None,
    verify: bool = True,
    rtol: Optional[float] = None,
) -> Dict[str, Any]:
    """Write a quantized model as an ONNX graph in look-up-table form (docs/deploy.md).

    Each quantized layer is exported as its packed codes (a uint8 initializer, the checkpoint's
    bytes), the integer ops that unpack them (``BitShift``, ``BitwiseAnd``), a ``GatherElements`` on
    the table (``[groups, 2**b]`` float initializer) and the layer's op; input quantizers become
    comparisons and ``Gather`` (N2UQ) or ``Round`` + ``Clip`` (LSQ). ``model``: a deployed model, or a
    fake-quant one (converted on a copy; the model passed is not changed); a model with no quantized
    layer is exported as it is (a float baseline with the same settings). ``example_inputs``: a
    tensor, a tuple of tensors, or a dict of keyword inputs (transformers). The batch dimension is dynamic unless ``dynamic_batch=False``; ``dynamic_shapes``
    (torch.export's format) overrides that. With ``verify``, onnxruntime runs the file on the example
    inputs and its output must match PyTorch's (:func:`verify_onnx`, ``rtol``).

    Returns ``{"path", "bytes", "max_abs_diff", "rel_l2"}`` (the last two None without ``verify``).
    Needs the ``deploy`` extra: ``pip install adq_hf[deploy]``.
    """
    try:
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise ImportError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'adq_hf[deploy]'.") from None
    if quantized_layers(model) and not is_deployed(model):
        model = convert_for_inference(copy.deepcopy(model))
    model.eval()
    args, kwargs = _as_args(example_inputs)
    if dynamic_shapes is None and dynamic_batch:
        args, kwargs = _batch_of_two(args), _batch_of_two(kwargs)
        dynamic_shapes = _batch_dynamic_shapes(args, kwargs)
    layers = deployed_layers(model)
    cached = {name: layer._buffers["decoded_weight"] for name, layer in layers}
    try:
        for _, layer in layers:
            layer._buffers["decoded_weight"] = None  # export the codes, never a cached float weight
            layer.__dict__["_exporting"] = True
        with torch.no_grad():
            torch.onnx.export(model, args, path, kwargs=kwargs or None, dynamo=True, dynamic_shapes=dynamic_shapes,
                              opset_version=opset_version, optimize=False, verbose=False, external_data=False,
                              custom_translation_table={lut_decode_op._opoverload: _onnx_lut_decode})
    finally:
        for name, layer in layers:
            layer.__dict__.pop("_exporting", None)
            layer._buffers["decoded_weight"] = cached[name]
    _finish_onnx(path)
    result = {"path": path, "bytes": os.path.getsize(path), "max_abs_diff": None, "rel_l2": None}
    if verify:
        result.update(verify_onnx(model, example_inputs, path, rtol=rtol))
    return result


# onnxscript's optimizer folds constant subgraphs whose inputs have at most this many elements: the
# exporter's small glue (casts of scalars, shapes; LSQ's step times its integer levels) folds, while a
# layer's packed codes (more than this, except for tiny layers) stay packed.
FOLD_INPUT_LIMIT = 64
WEIGHT_RTOL, ACTIVATION_RTOL = 1e-5, 0.1  # verify_onnx defaults


def _finish_onnx(path: str) -> None:
    """Fold the exporter's small constant glue (left unfolded, it keeps onnxruntime from fusing
    BatchNorm into Conv) without decoding the packed weights, and drop the per-node metadata
    (Python stack traces: most of a small model's file)."""
    import onnx_ir as ir
    import onnxscript.optimizer

    model = ir.load(path)
    # constant folding only: the optimizer's rewrite rules may reorder float arithmetic
    onnxscript.optimizer.fold_constants(model, input_size_limit=FOLD_INPUT_LIMIT)
    onnxscript.optimizer.remove_unused_nodes(model)
    for node in model.graph:
        node.metadata_props.clear()
    ir.save(model, path)


def onnx_session(path: str, threads: Optional[int] = None):
    """An onnxruntime CPU session (``threads``: intra-op threads; default onnxruntime's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # not the constant-folding notes about CastLike
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def onnx_feed(session, example_inputs) -> Dict[str, Any]:
    """onnxruntime inputs from the same example inputs as :func:`export_onnx`."""
    args, kwargs = _as_args(example_inputs)
    values = list(kwargs.values()) if kwargs else list(args)
    names = [i.name for i in session.get_inputs()]
    if kwargs and set(names) <= set(kwargs):
        return {n: kwargs[n].numpy() for n in names}
    return {n: v.numpy() for n, v in zip(names, values)}


def verify_onnx(model: nn.Module, example_inputs, path: str, rtol: Optional[float] = None) -> Dict[str, float]:
    """Run ``path`` in onnxruntime on ``example_inputs`` and compare its first output with PyTorch's.

    Returns ``{"max_abs_diff", "rel_l2"}`` (``rel_l2 = ||onnx - torch|| / ||torch||``) and raises
    :class:`OnnxMismatchError` when ``rel_l2 > rtol``. Default ``rtol``: 1e-5 when no layer quantizes its
    input (only float rounding differs); 0.1 when some do, because a float rounding difference
    between the two runtimes can move an activation across a rounding boundary, one level apart,
    and that difference propagates (measured: docs/deploy.md).
    """
    if rtol is None:
        rtol = ACTIVATION_RTOL if any(m.input_quantizer is not None for _, m in quantized_layers(model)) else WEIGHT_RTOL
    session = onnx_session(path)
    onnx_out = torch.from_numpy(session.run(None, onnx_feed(session, example_inputs))[0])
    args, kwargs = _as_args(example_inputs)
    with torch.no_grad():
        torch_out = _first_tensor(model(*args, **kwargs)).float()
    diff = (onnx_out.float() - torch_out)
    result = {"max_abs_diff": float(diff.abs().max()),
              "rel_l2": float(diff.norm() / torch_out.norm().clamp(min=torch.finfo(torch.float32).tiny))}
    if not result["rel_l2"] <= rtol:
        raise OnnxMismatchError(f"onnxruntime output of {path} differs from PyTorch: relative L2 error "
                             f"{result['rel_l2']:.3g} > {rtol} (max abs diff {result['max_abs_diff']:.3g}).")
    return result
