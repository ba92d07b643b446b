"""transformers glue: the ``"adq"`` quantization method in transformers' official registry.

``AutoModel*.from_pretrained(..., quantization_config=ADQConfig(...))`` quantizes a float checkpoint
(codebooks initialised from the loaded weights); a checkpoint saved by ``save_pretrained`` carries
``quantization_config`` and packed codes and loads back pre-quantized. All model surgery is
``adq_hf.quantize_model``; this file only maps transformers' hooks onto it.
"""

from __future__ import annotations

import re

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from ..config import QUANT_METHOD, ADQConfig
from ..nn import init_weight_quantizer, output_major, quantized_layers
from ..packing import packed_size, unpack_codes
from ..ptq import quantize_at_load
from ..serialization import CODES_SUFFIX, CheckpointError, quantized_state_dict
from ..quantize import quantize_model, weighting_needs_data
from ..surgery import register_post_convert_hook


class ADQHfQuantizer(HfQuantizer):
    """Quantizes on load (QAT-ready: ``is_trainable`` and ``is_qat_trainable``) and saves packed codes."""

    requires_calibration = False

    def __init__(self, quantization_config: ADQConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)

    def _process_model_before_weight_loading(self, model, keep_in_fp32_modules=None, **kwargs):
        config = self.quantization_config
        if not self.pre_quantized and config.codebook_weighting is not None:  # no calibration data here
            raise ValueError(weighting_needs_data(config))
        if keep_in_fp32_modules:
            config.modules_to_not_convert = sorted(set(config.modules_to_not_convert) | set(keep_in_fp32_modules))
        quantize_model(model, config, init_from_weights=False)
        # Keys this quantizer fills in itself after loading: not "missing" for transformers' report.
        ignore = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
        unexpected = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
        for name, layer in quantized_layers(model):
            weight = layer._parameters.pop("weight")  # (_parameters: a quantized subclass may have a weight property)
            layer.__dict__["_adq_float_weight"] = (tuple(weight.shape), weight.dtype)
            if not self.pre_quantized:
                ignore.add(rf"(^|\.){re.escape(name)}\.(weight_quantizer|input_quantizer)\.")
            if layer.tied_to is not None:  # computes with its owner's weight: tied again after loading
                layer._is_hf_initialized = True  # nothing of its own for transformers to initialise
                unexpected.add(rf"(^|\.){re.escape(name)}\.weight$")  # a checkpoint may hold the tied copy too
            elif self.pre_quantized:
                # The checkpoint stores packed uint8 codes under ``weight``: hold them in a buffer of
                # that shape while transformers loads, and turn them back into the float weight after.
                shape = (packed_size(weight.numel(), layer.weight_bits),)
                layer._buffers[CODES_SUFFIX] = torch.empty(shape, dtype=torch.uint8, device="meta")
            else:
                layer._parameters["weight"] = weight
        model._keys_to_ignore_on_load_missing = sorted(ignore)
        model._keys_to_ignore_on_load_unexpected = unexpected  # (a set: transformers unions it with one)
        _untie_quantized(model)
        _float_weights_while_initialising(model)
        return model

    @torch.no_grad()
    def _process_model_after_weight_loading(self, model, **kwargs):
        model.__dict__.pop("initialize_weights", None)  # (if transformers did not call it)
        layers = quantized_layers(model)
        for name, layer in layers:
            if layer.tied_to is not None:
                continue
            shape, dtype = layer.__dict__.pop("_adq_float_weight")
            if self.pre_quantized:
                packed = layer._buffers.pop(CODES_SUFFIX)
                if packed.device.type == "meta":
                    raise CheckpointError(f"the checkpoint has no {name}.{CODES_SUFFIX}: it is damaged or not an adq_hf checkpoint.")
                weight = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device=packed.device))
                rows = output_major(layer, weight)
                codes = unpack_codes(packed.cpu(), layer.weight_bits, weight.numel()).reshape(rows.shape)
                rows.copy_(layer.weight_quantizer.decode(codes.to(weight.device)).to(dtype))
                layer._parameters["weight"] = weight
            else:  # float checkpoint: quantizer state was created empty; initialise it now
                init_weight_quantizer(layer)  # (StdConv2d-like layers: standardised first)
        for _, layer in layers:
            if layer.tied_to is not None:  # the owner's (loaded or decoded) parameter, as transformers would tie it
                layer.__dict__.pop("_adq_float_weight", None)
                layer._parameters["weight"] = layer.tied_to._parameters["weight"]
            if not self.pre_quantized and layer.input_quantizer is not None:
                layer.input_quantizer.initialized.fill_(False)
        if not self.pre_quantized and self.quantization_config.ptq is not None:
            quantize_at_load(model, self.quantization_config)  # calibration at load (ADQConfig.ptq)
        return model

    def get_state_dict_and_metadata(self, model):
        return quantized_state_dict(model)

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False  # quantization happens in the modules, not per loaded tensor


def _untie_quantized(model) -> None:
    """Take the ties adq_hf quantizes (``adq_hf.nn.tie_layer``) out of transformers' tie map: the tied
    layer has no ``weight`` of its own while loading (adq_hf ties it again after), and transformers'
    tying (``get_parameter``) would fail on packed codes and on quantized classes whose ``weight`` is
    a property."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if not tied:
        return
    quantized = {f"{name}.weight" for name, _ in quantized_layers(model)}
    for target, source in list(tied.items()):
        if target in quantized or source in quantized:
            del tied[target]


def _float_weights_while_initialising(model) -> None:
    """transformers initialises what the checkpoint did not fill (``initialize_weights``, which skips
    loaded tensors) before adq_hf decodes the packed codes, and some ``_init_weights`` read a layer's
    ``weight`` (Whisper computes its sinusoidal positions from ``embed_positions.weight.shape``). For
    that one call, every quantized layer shows a float-shaped meta ``weight`` marked as initialised
    (packed codes and tied layers have none), then gets its own state back."""
    original = model.initialize_weights

    def initialize_weights():
        shown = []
        for _, layer in quantized_layers(model):
            if "weight" in layer._parameters or "_adq_float_weight" not in layer.__dict__:
                continue
            shape, dtype = layer.__dict__["_adq_float_weight"]
            placeholder = torch.empty(shape, dtype=dtype, device="meta")
            placeholder._is_hf_initialized = True
            shown.append((layer, layer._buffers.get("weight", _ABSENT)))
            layer._buffers["weight"] = placeholder
        try:
            return original()
        finally:
            del model.initialize_weights  # the class's method again
            for layer, own in shown:
                if own is _ABSENT:
                    del layer._buffers["weight"]
                else:
                    layer._buffers["weight"] = own

    model.initialize_weights = initialize_weights


_ABSENT = object()


def attach_quantizer(model, config: ADQConfig) -> None:
    """Make a transformers model quantized after loading (``quantize_model``, PTQ, mixed precision)
    save like one quantized by ``from_pretrained``: ``save_pretrained`` writes packed codes and
    ``quantization_config``, so ``from_pretrained`` loads it back quantized. Without this transformers
    saved float weights and no config (a float model on reload)."""
    from transformers import PreTrainedModel
    from transformers.quantizers.base import _assign_is_quantized

    if not isinstance(model, PreTrainedModel):
        return
    if getattr(model, "hf_quantizer", None) is None:  # from_pretrained sets its own after loading
        model.hf_quantizer = ADQHfQuantizer(config, pre_quantized=False)
        model.quantization_method = QUANT_METHOD
    model.config.quantization_config = config
    _assign_is_quantized(model)


def register() -> None:
    """Register ``"adq"`` with transformers (idempotent: re-import and reload are harmless)."""
    register_post_convert_hook(attach_quantizer)
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not ADQConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(ADQConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not ADQHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(ADQHfQuantizer)
