"""Look-up-table kernels for deploy mode: an optional C++ build (``lut_kernels.cpp``), the pure-PyTorch
path when it is absent.

The build is one ``g++`` call (about a second: the file uses no torch headers) cached under
``$ADQ_HF_KERNEL_CACHE`` (default ``~/.cache/adq_hf/kernels``), keyed by the source, the compiler,
its flags and the CPU (``-march=native``); it is loaded with ``ctypes``. Without a compiler, or when
the build fails (a warning says why), or with ``ADQ_HF_KERNELS=0``, deploy mode runs the PyTorch ops
it always had. ``kernels_available()`` says which; ``build_kernels()`` builds now (``adq-hf kernels``).

Three entry points, all on float32 CPU tensors:
* :func:`decode` packed codes -> float weight, exact (the table entries are copied);
* :func:`lut_linear` ``x @ W^T + b`` for a few rows of ``x`` without materialising ``W`` (codes are
  unpacked and looked up in registers inside the dot-product loop); equal to ``F.linear`` with the
  decoded weight up to float reassociation (docs/deploy.md);
* :func:`count_thresholds` N2UQ's deploy form, exact.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch

SOURCE = Path(__file__).with_name("lut_kernels.cpp")
FLAGS = ["-O3", "-march=native", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno"]

_lib = None
_state = {"tried": False, "error": None, "path": None}
_lock = threading.Lock()


def _cache_dir() -> Path:
    return Path(os.environ.get("ADQ_HF_KERNEL_CACHE") or Path.home() / ".cache" / "adq_hf" / "kernels")


def _compiler() -> Optional[str]:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _cpu_key() -> str:
    """What ``-march=native`` depends on: the CPU model and its flags."""
    try:
        with open("/proc/cpuinfo") as fh:
            lines = [ln for ln in fh if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _library_path(cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cxx, version, " ".join(FLAGS), platform.machine(),
                                    _cpu_key()]).encode()).hexdigest()[:16]
    return _cache_dir() / f"adq_lut_kernels-{key}.so"


def _compile(cxx: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: processes building at once never load a half-written file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        result = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"{cxx} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bind(lib) -> None:
    i64, ptr, c_int, c_float = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.adq_lut_simd.argtypes, lib.adq_lut_simd.restype = [], c_int
    lib.adq_lut_linear_vectorized.argtypes, lib.adq_lut_linear_vectorized.restype = [c_int, i64, i64], c_int
    lib.adq_lut_decode.argtypes = [ptr, i64, c_int, ptr, i64, i64, i64, i64, i64, i64, ptr]
    lib.adq_lut_linear.argtypes = [ptr, i64, ptr, i64, c_int, ptr, i64, i64, i64, i64, ptr, ptr]
    lib.adq_count_thresholds.argtypes = [ptr, i64, ptr, c_int, c_float, ptr, ptr]
    for fn in (lib.adq_lut_decode, lib.adq_lut_linear, lib.adq_count_thresholds):
        fn.restype = c_int


def build_kernels(retry: bool = False):
    """Build (or find in the cache) and load the C++ kernels; returns the library or ``None``.
    Tried once per process; ``retry=True`` tries again (after ``ADQ_HF_KERNELS``, ``CXX`` or the cache
    folder changed)."""
    global _lib
    if _state["tried"] and not retry:
        return _lib
    with _lock:
        if _state["tried"] and not retry:
            return _lib
        _state.update(tried=True, error=None, path=None)
        _lib = None
        if os.environ.get("ADQ_HF_KERNELS", "1") == "0":
            _state["error"] = "disabled by ADQ_HF_KERNELS=0"
            return None
        cxx = _compiler()
        if cxx is None:
            _state["error"] = "no C++ compiler found (g++, c++, clang++ or $CXX)"
            return None
        try:
            path = _library_path(cxx)
            if not path.exists():
                _compile(cxx, path)
            lib = ctypes.CDLL(str(path))
            _bind(lib)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            _state["error"] = str(exc)
            warnings.warn(f"adq_hf deploy kernels could not be built, deploy mode uses PyTorch ops (slower): {exc}",
                          stacklevel=2)
            return None
        _lib, _state["path"] = lib, str(path)
        return _lib


def kernels_available() -> bool:
    return build_kernels() is not None


def kernel_info() -> dict:
    """Whether the kernels are loaded, from where, with SIMD or not, and why not when they are not."""
    lib = build_kernels()
    return {"available": lib is not None, "path": _state["path"], "simd": bool(lib and lib.adq_lut_simd()),
            "error": _state["error"]}


# Up to this many rows of x the fused kernel is faster than decoding the weight and calling F.linear
# (measured on 896x896, 4864x896 and 896x4864 weights, one thread: docs/deploy.md). Above, the decoded
# weight's GEMM amortises the decode; 5-8 bit tables (32+ entries) are read with gathers, slower.
FUSED_MAX_ROWS = {bits: 12 if bits <= 4 else 4 for bits in range(1, 9)}


def fused_pays(bits: int, rows: int) -> bool:
    return rows <= FUSED_MAX_ROWS[bits]


def table_layout(table: torch.Tensor, rows: int, cols: int) -> Optional[Tuple[int, int]]:
    """``(row_stride, group_size)`` of a table over a ``[rows, cols]`` weight, or ``None`` when the
    kernels cannot read it. The table is ``[groups, 2**b]`` (groups: contiguous slices of the row-major
    weight: 1, one per row, or ``groups_per_row`` slices of ``cols / groups_per_row`` columns in each
    row) or ``[rows, groups_per_row, 2**b]``; a group that spans several rows is not supported."""
    if table.dim() == 3:
        if table.shape[0] != rows:
            return None
        table = table.reshape(-1, table.shape[-1])
    if table.dim() != 2:
        return None
    groups, levels = table.shape
    if groups == 1:
        return 0, cols
    if groups % rows == 0 and cols % (groups // rows) == 0:
        per_row = groups // rows
        return per_row * levels, cols // per_row
    return None


def vectorized(bits: int, cols: int, group_size: int) -> bool:
    """Whether :func:`lut_linear` runs the vector kernel (not its scalar loop) for this layout."""
    lib = build_kernels()
    return bool(lib is not None and lib.adq_lut_linear_vectorized(bits, cols, group_size))


def _usable(*tensors: Optional[torch.Tensor]) -> bool:
    return all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu") for t in tensors)


class LutPlan:
    """One weight's arguments for the kernels, worked out once: the table (contiguous float32, kept
    alive here), its layout, the pointers. Deployed layers keep theirs while its sources are unchanged
    (``DeployedLayerMixin.lut_plan``)."""

    __slots__ = ("lib", "packed", "table", "bias", "bits", "rows", "cols", "row_stride", "group_size", "args",
                 "sources")

    def __init__(self, lib, packed, table, bits, rows, cols, bias, layout, sources=()):
        self.lib, self.packed, self.table, self.bias = lib, packed, table, bias
        self.bits, self.rows, self.cols = bits, rows, cols
        self.row_stride, self.group_size = layout
        self.args = (packed.data_ptr(), packed.numel(), bits, table.data_ptr(), *layout, rows, cols)
        self.sources = sources

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + bias`` for ``x`` ``[..., cols]`` float32 (the fused kernel)."""
        x2 = x.reshape(-1, self.cols).contiguous()
        out = torch.empty(x2.shape[0], self.rows, dtype=torch.float32)
        packed, nbytes, bits, table, row_stride, group_size, rows, cols = self.args
        if self.lib.adq_lut_linear(x2.data_ptr(), x2.shape[0], packed, nbytes, bits, table, row_stride, group_size,
                                   rows, cols, None if self.bias is None else self.bias.data_ptr(), out.data_ptr()):
            raise RuntimeError("adq_lut_linear rejected its arguments")  # checked when the plan was made
        return out.reshape(*x.shape[:-1], self.rows)

    def decode(self) -> torch.Tensor:
        """The ``[rows, cols]`` float32 weight, exact."""
        out = torch.empty(self.rows, self.cols, dtype=torch.float32)
        if self.lib.adq_lut_decode(*self.args, 0, self.rows, out.data_ptr()):
            raise RuntimeError("adq_lut_decode rejected its arguments")
        return out


def make_plan(packed: torch.Tensor, table: torch.Tensor, bits: int, rows: int, cols: int,
              bias: Optional[torch.Tensor] = None, sources=()) -> Optional[LutPlan]:
    """A :class:`LutPlan`, or ``None`` when the kernels cannot run this weight (no build, a table that is
    not float32 on the CPU, a layout they do not read, codes that do not fill the shape)."""
    lib = build_kernels()
    if (lib is None or not _usable(table, bias) or packed.device.type != "cpu" or packed.dtype != torch.uint8
            or not packed.is_contiguous() or packed.numel() * 8 < rows * cols * bits or not 1 <= bits <= 8):
        return None
    layout = table_layout(table, rows, cols)
    if layout is None or table.shape[-1] != 2**bits:
        return None
    return LutPlan(lib, packed, table.contiguous(), bits, rows, cols, None if bias is None else bias.contiguous(),
                   layout, sources)


def decode(packed: torch.Tensor, table: torch.Tensor, bits: int, rows: int, cols: int) -> Optional[torch.Tensor]:
    """The ``[rows, cols]`` float weight, or ``None`` when the kernels cannot do it (no build, layout)."""
    plan = make_plan(packed, table, bits, rows, cols)
    return None if plan is None else plan.decode()


def lut_linear(x: torch.Tensor, packed: torch.Tensor, table: torch.Tensor, bits: int, rows: int, cols: int,
               bias: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """``x @ W^T + bias`` from the codes (``x``: ``[..., cols]``), or ``None`` when the kernels cannot."""
    plan = make_plan(packed, table, bits, rows, cols, bias) if _usable(x) else None
    return None if plan is None else plan.linear(x)


def count_thresholds(x: torch.Tensor, thresholds: torch.Tensor, zero_point: float,
                     scale: torch.Tensor) -> Optional[torch.Tensor]:
    """``scale * (zero_point + #{t <= x})`` elementwise (N2UQ's deploy form; ``scale``: a one-element
    float32 tensor, read in place), or ``None`` when the kernels cannot."""
    lib = _lib if _state["tried"] else build_kernels()
    if (lib is None or x.dtype != torch.float32 or x.device.type != "cpu" or not _usable(thresholds, scale)
            or scale.numel() != 1):
        return None
    xc, t = x.contiguous(), thresholds.contiguous()
    out = torch.empty_like(xc)
    lib.adq_count_thresholds(xc.data_ptr(), xc.numel(), t.data_ptr(), t.numel(), float(zero_point),
                             scale.contiguous().data_ptr(), out.data_ptr())
    return out
