"""ONNX export in look-up-table form, checked in onnxruntime."""

from __future__ import annotations

import copy
import math
import os
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from ..nn import quantized_layers
from ..packing import packed_size
from .decode import lut_decode_op
from .layers import convert_for_inference, deployed_layers, is_deployed


class OnnxMismatchError(RuntimeError):
    """onnxruntime's output of an exported file does not match PyTorch's."""


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


def _map_tensors(value, fn):
    """``value`` (a tensor, or tuples, lists and dicts of them and other things) with ``fn`` applied to
    every tensor."""
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _batch_of_two(value):
    """Example inputs with batch 1 repeated to batch 2: torch.export specialises size-1 dimensions."""
    return _map_tensors(value, lambda t: torch.cat([t, t]) if t.dim() > 0 and t.shape[0] == 1 else t)


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

    Returns ``{"path", "bytes", "max_abs_diff", "rel_l2", "rel_l2_float64"}`` (the last three None
    without ``verify``; see :func:`verify_onnx`).
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
    result = {"path": path, "bytes": os.path.getsize(path), "max_abs_diff": None, "rel_l2": None,
              "rel_l2_float64": None}
    if verify:
        result.update(verify_onnx(model, example_inputs, path, rtol=rtol))
    return result


# onnxscript's optimizer folds constant subgraphs whose inputs have at most this many elements: the
# exporter's small glue (casts of scalars, shapes; LSQ's step times its integer levels) folds, while a
# layer's packed codes (more than this, except for tiny layers) stay packed.
FOLD_INPUT_LIMIT = 64
WEIGHT_RTOL, ACTIVATION_RTOL = 1e-5, 0.1  # verify_onnx defaults
ROUNDING_FACTOR = 3.0  # verify_onnx: how much farther from the float64 result onnxruntime may be than PyTorch


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


def _float64_output(model: nn.Module, example_inputs) -> torch.Tensor:
    """``model``'s first output computed in float64 on a copy: the same quantized network (float32
    values are exact in float64) with rounding errors 2**29 times smaller, the reference both runtimes
    approximate. The copy is dropped on return."""
    reference = copy.deepcopy(model).double()
    args, kwargs = _as_args(_map_tensors(example_inputs, lambda t: t.double() if t.is_floating_point() else t))
    with torch.no_grad():
        return _first_tensor(reference(*args, **kwargs)).double()


def _rel_l2(a: torch.Tensor, reference: torch.Tensor) -> float:
    return float((a - reference).norm() / reference.norm().clamp(min=torch.finfo(torch.float32).tiny))


def verify_onnx(model: nn.Module, example_inputs, path: str, rtol: Optional[float] = None) -> Dict[str, Any]:
    """Run ``path`` in onnxruntime on ``example_inputs`` and compare its first output with PyTorch's.

    Returns ``{"max_abs_diff", "rel_l2", "rel_l2_float64"}`` (``rel_l2 = ||onnx - torch|| /
    ||torch||``) and raises :class:`OnnxMismatchError` when the two differ by more than float rounding
    explains. With ``rtol`` given: when ``rel_l2 > rtol``. By default, when no layer quantizes its input
    (only float rounding differs): when ``rel_l2 > 1e-5``. When some do, a float rounding difference
    between the runtimes (both round as accurately; they differ in the last bits of convolutions,
    matmuls, LayerNorm, softmax, GELU) can move an activation across a quantizer's threshold, one level,
    which perturbs a whole row of the next layer and flips more there: in a deep model the cascade
    spreads until the outputs differ by about the activation quantization error. So: ``rel_l2 <= 0.1``
    passes; above, the model runs in float64 on a copy (``rel_l2_float64``: ``{"onnxruntime",
    "pytorch"}``, each output's relative L2 error to that reference, else None) and the file passes when
    onnxruntime is at most ``ROUNDING_FACTOR`` (3) times as far from it as PyTorch's own float32 output
    is (measured: docs/deploy.md, "ONNX tolerance").
    """
    quantized_inputs = any(m.input_quantizer is not None for _, m in quantized_layers(model))
    session = onnx_session(path)
    onnx_out = torch.from_numpy(session.run(None, onnx_feed(session, example_inputs))[0]).float()
    args, kwargs = _as_args(example_inputs)
    with torch.no_grad():
        torch_out = _first_tensor(model(*args, **kwargs)).float()
    result = {"max_abs_diff": float((onnx_out - torch_out).abs().max()), "rel_l2": _rel_l2(onnx_out, torch_out),
              "rel_l2_float64": None}
    tolerance = rtol if rtol is not None else ACTIVATION_RTOL if quantized_inputs else WEIGHT_RTOL
    if result["rel_l2"] <= tolerance:
        return result
    message = (f"onnxruntime output of {path} differs from PyTorch: relative L2 error {result['rel_l2']:.3g} > "
               f"{tolerance:g} (max abs diff {result['max_abs_diff']:.3g}).")
    if rtol is None and quantized_inputs:
        try:
            exact = _float64_output(model, example_inputs)
        except (RuntimeError, TypeError, NotImplementedError) as error:
            raise OnnxMismatchError(message + f" The float64 reference that would tell whether float rounding "
                                    f"explains it failed ({error}); pass rtol= to accept a larger difference."
                                    ) from error
        errors = {"onnxruntime": _rel_l2(onnx_out.double(), exact), "pytorch": _rel_l2(torch_out.double(), exact)}
        result["rel_l2_float64"] = errors
        if errors["onnxruntime"] <= ROUNDING_FACTOR * errors["pytorch"]:
            return result
        message += (f" Against the model computed in float64, onnxruntime's relative L2 error is "
                    f"{errors['onnxruntime']:.3g} and PyTorch's (float32) {errors['pytorch']:.3g}: more than "
                    f"{ROUNDING_FACTOR:g} times, which float rounding flipping quantized activations does not explain "
                    f"(unless so few flip that PyTorch's output happened to flip none: then compare on a batch of "
                    f"several inputs, or pass rtol=).")
    raise OnnxMismatchError(message)
