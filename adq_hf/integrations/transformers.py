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
from ..nn import quantized_layers
from ..packing import packed_size, unpack_codes
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
        for name, layer in quantized_layers(model):
            if self.pre_quantized:
                # The checkpoint stores packed uint8 codes under ``weight``: hold them in a buffer of
                # that shape while transformers loads, and turn them back into the float weight after.
                weight = layer._parameters.pop("weight")
                layer._adq_float_weight = (tuple(weight.shape), weight.dtype)
                shape = (packed_size(weight.numel(), layer.weight_bits),)
                layer.register_buffer(CODES_SUFFIX, torch.empty(shape, dtype=torch.uint8, device="meta"))
            else:
                ignore.add(rf"(^|\.){re.escape(name)}\.(weight_quantizer|input_quantizer)\.")
        model._keys_to_ignore_on_load_missing = sorted(ignore)
        return model

    @torch.no_grad()
    def _process_model_after_weight_loading(self, model, **kwargs):
        for name, layer in quantized_layers(model):
            if self.pre_quantized:
                packed = layer._buffers.pop(CODES_SUFFIX)
                shape, dtype = layer.__dict__.pop("_adq_float_weight")
                if packed.device.type == "meta":
                    raise CheckpointError(f"the checkpoint has no {name}.{CODES_SUFFIX}: it is damaged or not an adq_hf checkpoint.")
                weight = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device=packed.device))
                codes = unpack_codes(packed.cpu(), layer.weight_bits, weight.numel()).reshape(shape)
                weight.copy_(layer.weight_quantizer.decode(codes.to(weight.device)).to(dtype))
                layer.register_parameter("weight", weight)
            else:  # float checkpoint: quantizer state was created empty; initialise it now
                layer.weight_quantizer.init_from(layer.latent_weight())
                if layer.input_quantizer is not None:
                    layer.input_quantizer.initialized.fill_(False)
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
