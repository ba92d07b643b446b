"""adq_hf: distribution-aware, mixed-precision quantization for timm and transformers models.

``import adq_hf`` registers the ``"adq"`` quantization method with transformers and lets
``timm.create_model`` take ``quantization_config=``.
"""

__version__ = "0.1.0"

from . import models  # noqa: F401  (registers resnet20_cifar with timm)
from .config import ADQConfig
from .nn import QuantConv2d, QuantLinear, quantized_layers
from .quantize import quantize_model
from .surgery import average_weight_bits, bit_map, calibrate_activations
from .integrations import timm as _timm_integration
from .integrations import transformers as _transformers_integration
from .integrations.timm import create_model, save_pretrained
from .mixed_precision import allocate_bits, estimate_sensitivity, write_report
from . import hub, ptq
from .hub import push_to_hub
from .importance import fit_codebooks
from .deploy import convert_for_inference, export_onnx, memory_report, resident_bytes

_timm_integration.install()
_transformers_integration.register()

__all__ = [
    "ADQConfig",
    "allocate_bits",
    "estimate_sensitivity",
    "export_onnx",
    "fit_codebooks",
    "write_report",
    "QuantConv2d",
    "QuantLinear",
    "average_weight_bits",
    "bit_map",
    "calibrate_activations",
    "convert_for_inference",
    "create_model",
    "hub",
    "memory_report",
    "ptq",
    "push_to_hub",
    "save_pretrained",
    "quantize_model",
    "quantized_layers",
    "resident_bytes",
]
