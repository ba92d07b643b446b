"""Deployed layers: packed codes in memory, the table in the weight quantizer, decoded on the fly;
inference only (training and backward are refused)."""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..nn import (
    WEIGHT_LAYER_TYPES,
    QuantizedLayerMixin,
    _QuantizedWeightAttribute,
    output_major,
    quantized_layers,
    transposed_linear_forward,
)
from ..packing import pack_codes, packed_size
from . import kernels
from .decode import lut_decode, lut_decode_op, lut_decode_rows
from .inputs import input_form

_FIX = ("load the fake-quant model for training (timm.create_model(...) without deploy=True, "
        "AutoModel.from_pretrained(...) without adq_hf.convert_for_inference).")


class TrainingRefusedError(RuntimeError):
    """A deployed (inference-only) model was asked to train."""


def _refusal(what: str) -> str:
    return (f"{what}: this model is in adq_hf deploy mode (adq_hf.convert_for_inference): its quantized layers hold "
            f"only packed codes and look-up tables, no float weights to train; {_FIX}")


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
        """The packed codes (of the owner, for a layer tied to another's weight)."""
        return (self.tied_to or self)._buffers["weight"]

    @property
    def code_shape(self) -> Tuple[int, ...]:
        """The weight's shape in the layout its codes are packed in (output channels first)."""
        return tuple(output_major(self, torch.empty(self.weight_shape, device="meta")).shape)

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

    def __getstate__(self):
        # copies and pickles rebuild the kernels' plan (it holds pointers and the loaded library)
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {k: v for k, v in state.items() if k != "_lut_plan"}

    def lut_plan(self) -> Optional[kernels.LutPlan]:
        """The kernels' arguments for this layer (``None``: the kernels cannot run it), kept while the
        codes, the bias and the weight quantizer's tensors are the same objects, unmodified in place."""
        quantizer = self.weight_quantizer
        bias = getattr(self, "bias", None)  # (embeddings have none)
        sources = (self.packed_weight, bias, *quantizer._parameters.values(), *quantizer._buffers.values())
        cached = self.__dict__.get("_lut_plan")
        if cached is not None and len(cached[0]) == len(sources) and all(
                a is b and (a is None or a._version == v) for (a, v), b in zip(cached[0], sources)):
            return cached[1]
        rows = self.code_shape[0]  # codes are output-major (transformers' Conv1D too)
        plan = kernels.make_plan(self.packed_weight, self.table(), self.weight_bits, rows, self.weight_numel // rows,
                                 bias)
        self.__dict__["_lut_plan"] = (tuple((t, None if t is None else t._version) for t in sources), plan)
        return plan

    def decode_weight(self) -> torch.Tensor:
        if self.__dict__.get("_exporting"):  # one operator, which export_onnx translates (_onnx_lut_decode)
            rows = lut_decode_op(self.packed_weight, self.table(), self.weight_bits, list(self.code_shape))
        elif torch.compiler.is_compiling():  # compiled: inductor fuses the PyTorch form into the layer
            rows = lut_decode(self.packed_weight, self.table(), self.weight_bits, self.code_shape)
        else:
            plan = self.lut_plan()
            rows = (plan.decode().view(self.code_shape) if plan is not None
                    else lut_decode(self.packed_weight, self.table(), self.weight_bits, self.code_shape))
        return output_major(self, rows)

    def fused_linear(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``x @ W^T + bias`` by the fused look-up-table kernel (``x``: ``[..., in]``, W never
        materialised), or ``None`` where it does not apply or does not pay: no kernel build, the
        layer set to ``exact``, a cached weight, export or compile, more rows than
        ``kernels.FUSED_MAX_ROWS``. Equal to ``F.linear`` up to float reassociation (docs/deploy.md)."""
        d = self.__dict__
        if (d.get("_exact") or d.get("_exporting") or (self.tied_to or self)._buffers.get("decoded_weight") is not None
                or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() == 0 or torch.compiler.is_compiling()):
            return None
        cols = x.shape[-1]
        if not kernels.fused_pays(self.weight_bits, x.numel() // max(cols, 1)):
            return None
        plan = self.lut_plan()
        if plan is None or plan.cols != cols:
            return None
        return plan.linear(x)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input quantizer's eval-mode output, through its deploy form (:func:`input_form`)."""
        quantizer = self._modules.get("input_quantizer")
        if quantizer is None:
            return x
        form = self.__dict__.get("_input_form")
        if form is None or x.dtype != torch.float32:
            if self.__dict__.get("_exporting"):
                raise NotImplementedError(f"ONNX export has no form for {type(quantizer).__name__} here: it must be a "
                                          "calibrated n2uq or lsq quantizer on float32 inputs.")
            out = quantizer(x).to(x.dtype)  # uncalibrated (it initialises now), another dtype, or no deploy form
            if form is None and bool(quantizer.initialized):
                self.prepare_input_form()  # calibrated by this call: use the deploy form from now on
            return out
        return form(self, x)

    def prepare_input_form(self) -> None:
        """(Re)build the input quantizer's deploy form from its current state (after loading, calibrating)."""
        self._buffers["input_thresholds"] = None
        self.__dict__["_input_form"] = input_form(self)

    def quantized_weight(self) -> torch.Tensor:
        if self.tied_to is not None:  # the owner's (cached) weight: the same tensor in the same layout
            return self.tied_to.quantized_weight()
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
        x = self.quantize_input(x)
        out = self.fused_linear(x)
        if out is None:
            out = F.linear(x, self.quantized_weight(), self.bias)
        return self._guard(out)


class DeployedConv2d(DeployedLayerMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(x)
        out = self._fused_conv(x)
        if out is None:
            out = self._conv_forward(x, self.quantized_weight(), self.bias)
        return self._guard(out)

    def _fused_conv(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """im2col + the fused kernel, when the output has few positions (``N * H_out * W_out`` rows of
        the matmul: the same rule as Linear's); otherwise ``None`` (decode + the conv)."""
        if (self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str) or x.dim() != 4
                or self.__dict__.get("_exact") or torch.compiler.is_compiling()):
            return None
        kh, kw = self.kernel_size
        ho = (x.shape[2] + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        wo = (x.shape[3] + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        if ho <= 0 or wo <= 0 or not kernels.fused_pays(self.weight_bits, x.shape[0] * ho * wo):
            return None
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride).transpose(1, 2)
        out = self.fused_linear(cols)
        return None if out is None else out.transpose(1, 2).reshape(x.shape[0], -1, ho, wo)


class DeployedConv1d(DeployedLayerMixin, nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._guard(self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias))


class DeployedConv1D(DeployedLayerMixin, Conv1D):
    """transformers' ``Conv1D``: codes packed output-major, the decoded weight transposed back (a view)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(x)
        out = self.fused_linear(x)  # x @ W^T + b with W output-major: Conv1D's x @ weight + b
        if out is None:
            out = transposed_linear_forward(self, x, self.quantized_weight())
        return self._guard(out)


class DeployedEmbedding(DeployedLayerMixin, nn.Embedding):
    """Decodes only the rows it looks up (``lut_decode_rows``); the whole table when it is cached or
    exported (ONNX gets ``GatherElements`` on the table, then ``Gather``)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        owner = self.tied_to or self
        table = self.table()
        if (owner._buffers.get("decoded_weight") is not None or self.__dict__.get("_exporting")
                or table.shape[0] not in (1, self.code_shape[0])):
            return self._guard(F.embedding(input, self.quantized_weight(), self.padding_idx))
        return self._guard(lut_decode_rows(self.packed_weight, table, self.weight_bits, self.code_shape, input))


class _DeployedOwnForward(DeployedLayerMixin):
    """timm's forward-overriding convs and embedding subclasses: their own forward reads ``self.weight``
    (the decoded weight)."""

    def forward(self, *args, **kwargs):
        if self.input_quantizer is not None:
            args = (self.quantize_input(args[0]),) + args[1:]
        return self._guard(super().forward(*args, **kwargs))


_DEPLOYED_CLASSES: Dict[type, type] = {}


def _float_class(quant_cls: type) -> type:
    """The float layer class a quantized class was made from (``QuantStdConv2d`` -> ``StdConv2d``)."""
    return next(c for c in quant_cls.__mro__ if issubclass(c, WEIGHT_LAYER_TYPES) and not issubclass(c, QuantizedLayerMixin))


_DEPLOYED_BASES = ((nn.Linear, DeployedLinear), (nn.Conv1d, DeployedConv1d), (nn.Conv2d, DeployedConv2d),
                   (Conv1D, DeployedConv1D), (nn.Embedding, DeployedEmbedding))


def deployed_class_for(quant_cls: type) -> type:
    """The deployed class of a quantized layer class (made once, importable from this module)."""
    if quant_cls in _DEPLOYED_CLASSES:
        return _DEPLOYED_CLASSES[quant_cls]
    float_cls = _float_class(quant_cls)
    if issubclass(quant_cls, _QuantizedWeightAttribute):
        bases = (_DeployedOwnForward, float_cls)
    else:
        base, deployed = next((b, d) for b, d in _DEPLOYED_BASES if issubclass(float_cls, b))
        bases = (deployed,) if float_cls is base else (deployed, float_cls)
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
    if packed is None and layer.tied_to is None:  # a tied layer decodes its owner's codes
        packed = pack_codes(layer.weight_quantizer.encode(output_major(layer, weight)), layer.weight_bits)
    cls = deployed_class_for(type(layer))
    del layer._parameters["weight"]
    layer.__class__ = cls
    if layer.tied_to is None:
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
        if layer.tied_to is not None:  # uses its owner's cache
            continue
        nbytes = math.prod(layer.weight_shape) * torch.empty((), dtype=layer.weight_dtype).element_size()
        if max_bytes is None or total + nbytes <= max_bytes:
            layer._buffers["decoded_weight"] = layer.decode_weight()
            total += nbytes
    return total


def set_exact(model: nn.Module, exact: bool = True) -> None:
    """``exact=True``: every deployed layer's output is bit-identical to the fake-quant layer's (the fused
    look-up-table matmul, equal up to float reassociation, is not used); ``False``: the default."""
    for _, layer in deployed_layers(model):
        layer.__dict__["_exact"] = bool(exact)


def convert_for_inference(
    model: nn.Module, cache_bytes: Optional[float] = 0, compile: bool = False, exact: bool = False,
    **compile_kwargs: Any
) -> nn.Module:
    """Convert a quantized (fake-quant) model for inference, in place; returns it.

    Every quantized layer keeps its packed codes, look-up table, bias and input quantizer; the float
    latent weights are freed. ``cache_bytes``: memory budget for decoded weights kept between calls
    (default 0: weights are decoded at every call and resident memory stays at the information limit;
    ``None``: cache every layer: no decoding cost, fp32 weight memory). ``compile=True`` also compiles the model in
    place with ``torch.compile`` (``compile_kwargs`` go to it; run it under ``torch.no_grad()``).
    ``exact=True``: outputs bit-identical to the fake-quant model (see :func:`set_exact`); by default
    Linear layers with few input rows (decoding a token) use the fused look-up-table kernel, equal up
    to float reassociation. The measured trade-offs are in docs/deploy.md.
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
    set_exact(model, exact)
    kernels.build_kernels()  # now rather than at the first call (a warning says why when it cannot)
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
