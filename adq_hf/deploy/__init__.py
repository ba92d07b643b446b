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

Modules: ``decode`` (codes -> table -> weight), ``kernels`` (the optional C++ look-up-table kernels:
fused matmul, fast decode), ``inputs`` (input quantizers in deploy form), ``layers`` (deployed layers,
``convert_for_inference``), ``memory`` (resident bytes), ``onnx`` (export).
"""

from .decode import lut_decode, lut_decode_op
from .inputs import input_form, n2uq_thresholds
from .layers import (
    DeployedConv2d,
    DeployedLayerMixin,
    DeployedLinear,
    TrainingRefusedError,
    convert_for_inference,
    convert_for_loading,
    deploy_layer,
    deployed_class_for,
    deployed_layers,
    is_deployed,
    set_exact,
    set_weight_cache,
)
from .kernels import build_kernels, kernel_info
from .memory import memory_report, resident_bytes
from .onnx import OnnxMismatchError, export_onnx, onnx_feed, onnx_session, verify_onnx

__all__ = [
    "DeployedConv2d",
    "DeployedLayerMixin",
    "DeployedLinear",
    "OnnxMismatchError",
    "TrainingRefusedError",
    "convert_for_inference",
    "convert_for_loading",
    "deploy_layer",
    "deployed_class_for",
    "deployed_layers",
    "export_onnx",
    "input_form",
    "is_deployed",
    "lut_decode",
    "lut_decode_op",
    "memory_report",
    "n2uq_thresholds",
    "onnx_feed",
    "onnx_session",
    "resident_bytes",
    "set_exact",
    "set_weight_cache",
    "build_kernels",
    "kernel_info",
    "verify_onnx",
]
