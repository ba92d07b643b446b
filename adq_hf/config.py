"""``ADQConfig``: what to quantize and how, as a transformers quantization config.

The same object drives timm, transformers and the recipes, and is written to ``config.json`` as
``quantization_config`` so a checkpoint says how to rebuild itself. Every field is validated here,
once, with an error naming the field and its allowed values.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any, Dict, List, Optional

from transformers.utils.quantization_config import QuantizationConfigMixin

from .quantizers import ACTIVATION_QUANTIZERS, RANGE_ESTIMATORS, WEIGHT_QUANTIZERS

QUANT_METHOD = "adq"
BITS_RANGE = range(2, 9)
# Named in the roadmap; selecting one before it exists gives a clear "not available yet" error.
PLANNED_WEIGHT_QUANTIZERS: tuple = ()
PLANNED_ACTIVATION_QUANTIZERS: tuple = ()
GRANULARITIES = ("per_tensor", "per_channel", "per_group")
GROUP_TABLES = ("scaled", "codebooks")
GROUPED_WEIGHT_QUANTIZERS = ("adq", "lsq")  # POST has one scale per output channel by definition
CODEBOOK_WEIGHTINGS = ("hessian", "fisher")
CODEBOOK_INITS = ("quantile", "uniform")
CODEBOOK_UPDATES = ("ema", "static")
PTQ_METHODS = ("rtn", "gptq", "obq", "sa")
# Given to the constructor for calibration at load, never written to config.json (docs/ptq.md).
RUNTIME_FIELDS = ("calibration_dataset", "tokenizer")


def _check_bits(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value not in BITS_RANGE:
        allowed = "an integer from 2 to 8" + (" or None" if allow_none else "")
        raise ValueError(f"ADQConfig.{name}={value!r} is invalid: expected {allowed}.")


def _check_choice(name: str, value, choices, planned=()) -> None:
    if value in planned:
        raise ValueError(
            f"ADQConfig.{name}={value!r} is planned but not available in this version; "
            f"choose one of {sorted(choices)}."
        )
    if not isinstance(value, str) or value not in choices:  # (an unhashable value must not raise TypeError)
        raise ValueError(f"ADQConfig.{name}={value!r} is invalid: expected one of {sorted(choices)}.")


def _check_patterns(name: str, patterns) -> None:
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"ADQConfig.{name} entries must be module names or regexes (str), got {pattern!r}.")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"ADQConfig.{name} entry {pattern!r} is not a valid regex: {err}.") from None


class ADQConfig(QuantizationConfigMixin):
    """Configuration of ADQ quantization (``quant_method="adq"``).

    Args:
        weight_bits: default bits of quantized weights (2-8).
        activation_bits: bits of layer inputs; ``None`` keeps activations in float (weight-only).
        weight_quantizer: ``"adq"`` (codebook, quantile init + EMA), ``"lsq"`` (uniform, learned step)
            or ``"post"`` (powers of sqrt(2) times a learned per-channel scale).
        activation_quantizer: ``"n2uq"`` (learned thresholds, uniform levels), ``"lsq"`` or ``"asq"``
            (LSQ with a per-sample / per-token step multiplier from a small adapter).
        layer_bits: ``{module name or regex: bits}``; the first full match wins, over every default
            (a mixed-precision bit map; the allocator writes it here).
        modules_to_not_convert: module names or regexes kept in float (a name also covers its children).
        first_layer_bits / last_layer_bits: bits of the model's first layer (stem conv / patch embed)
            and classifier; ``None`` keeps them in float. Their input quantizer uses the same bits.
        embedding_bits: bits of ``nn.Embedding`` tables (weight only: their inputs are indices);
            ``None`` (the default) keeps them in float. A weight tied between layers (an LM head
            tied to the input embedding) is quantized once, at the highest bits any of its layers
            gets, and only when none of them stays float (docs/methods.md, "Tied weights").
        granularity: one codebook/step per tensor (``"per_tensor"``), per output channel
            (``"per_channel"``) or per group of ``group_size`` input columns of an output channel
            (``"per_group"``; adq and lsq; POST always has one scale per output channel).
        group_size: columns per group with ``granularity="per_group"`` (a convolution's columns are
            ``in * kh * kw``; a weight whose columns are not a multiple gets one group per output channel).
        group_tables: the ADQ tables of ``per_group``: ``"scaled"`` (one codebook per tensor times a
            float16 scale per group, the default: fewer bytes and lower error, docs/methods.md) or
            ``"codebooks"`` (a codebook per group).
        codebook_init: ``"quantile"`` (ADQ) or ``"uniform"`` (ablation).
        codebook_init_iters: at most this many Lloyd iterations (zero kept; they stop early at the fixed
            point) run on the initial codebook, so training starts at the fixed point of the EMA update
            instead of drifting to it; 0 keeps the raw init.
        codebook_update: ``"ema"`` (ADQ online adaptation) or ``"static"`` (ablation).
        codebook_weighting: ``None`` (plain k-means) or the per-weight importance the ADQ codebooks are
            fitted with, from calibration data (``quantize_model(..., calibration_data=...)`` or
            ``adq_hf.fit_codebooks`` after loading): ``"hessian"`` (the layer input's second moment,
            the diagonal of PTQ's Hessian) or ``"fisher"`` (squared gradients); see ``adq_hf.importance``.
        ema_decay: EMA decay ``m`` in ``c <- m c + (1 - m) mean``, in (0, 1).
        ema_update_interval: optimiser steps between codebook updates (>= 1).
        target_avg_bits: a parameter-weighted average weight-bit budget for mixed precision; the
            allocation turns it into ``layer_bits`` from calibration data.
        ptq: a PTQ method (``"rtn"``, ``"gptq"``, ``"obq"``, ``"sa"``) run while loading a float
            checkpoint (``from_pretrained``, ``timm.create_model``), block by block, on
            ``calibration_dataset``; ``None``: no PTQ. Saved in config.json as a record of how the
            weights were made (a saved checkpoint loads pre-quantized, without PTQ).
        calibration_dataset: the calibration data of ``ptq``: batches, a list of strings, or a
            ``datasets.Dataset`` (``adq_hf.calibration.calibration_batches``). Not serialized.
        tokenizer: turns text calibration data into batches (default: the checkpoint's own
            tokenizer, ``AutoTokenizer.from_pretrained``). Not serialized.
        activation_init: how calibration (``adq_hf.calibrate_activations``, several batches) sets each
            input quantizer's step: ``"mse"`` (least squared error on the observed inputs),
            ``"percentile"`` (99.99th percentile of ``|x|`` is the largest level), ``"minmax"`` (nothing
            clipped) or ``"mean"`` (LSQ's ``2 mean|x| / sqrt(Qp)``); docs/methods.md has the measurements.
    """

    def __init__(
        self,
        weight_bits: int = 4,
        activation_bits: Optional[int] = None,
        weight_quantizer: str = "adq",
        activation_quantizer: str = "n2uq",
        layer_bits: Optional[Dict[str, int]] = None,
        modules_to_not_convert: Optional[List[str]] = None,
        first_layer_bits: Optional[int] = 8,
        last_layer_bits: Optional[int] = 8,
        embedding_bits: Optional[int] = None,
        granularity: str = "per_tensor",
        group_size: int = 128,
        group_tables: str = "scaled",
        codebook_init: str = "quantile",
        codebook_init_iters: int = 30,
        codebook_update: str = "ema",
        codebook_weighting: Optional[str] = None,
        ema_decay: float = 0.99,
        ema_update_interval: int = 1,
        target_avg_bits: Optional[float] = None,
        ptq: Optional[str] = None,
        calibration_dataset: Any = None,
        tokenizer: Any = None,
        activation_init: str = "mse",
        quant_method: str = QUANT_METHOD,
        **kwargs: Any,
    ):
        if kwargs:
            raise ValueError(
                f"ADQConfig got unknown field(s) {sorted(kwargs)}; known fields: {sorted(self._field_names())}."
            )
        if quant_method != QUANT_METHOD:
            raise ValueError(f"ADQConfig.quant_method={quant_method!r} is invalid: expected {QUANT_METHOD!r}.")
        self.quant_method = QUANT_METHOD
        self.weight_bits = weight_bits
        self.activation_bits = activation_bits
        self.weight_quantizer = weight_quantizer
        self.activation_quantizer = activation_quantizer
        self.layer_bits = dict(layer_bits) if isinstance(layer_bits, dict) else (layer_bits or {})
        # a list/tuple is copied; anything else (a bare string, a number) is kept for post_init to reject
        self.modules_to_not_convert = (
            list(modules_to_not_convert) if isinstance(modules_to_not_convert, (list, tuple))
            else [] if modules_to_not_convert is None else modules_to_not_convert
        )
        self.first_layer_bits = first_layer_bits
        self.last_layer_bits = last_layer_bits
        self.embedding_bits = embedding_bits
        self.granularity = granularity
        self.group_size = group_size
        self.group_tables = group_tables
        self.codebook_init = codebook_init
        self.codebook_init_iters = codebook_init_iters
        self.codebook_update = codebook_update
        self.codebook_weighting = codebook_weighting
        self.ema_decay = ema_decay
        self.ema_update_interval = ema_update_interval
        self.target_avg_bits = target_avg_bits
        self.ptq = ptq
        self.calibration_dataset = calibration_dataset
        self.tokenizer = tokenizer
        self.activation_init = activation_init
        self.post_init()

    @classmethod
    def _field_names(cls):
        import inspect

        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")]

    def post_init(self) -> None:
        """Validate every field (also called by transformers after construction)."""
        _check_bits("weight_bits", self.weight_bits)
        _check_bits("activation_bits", self.activation_bits, allow_none=True)
        _check_bits("first_layer_bits", self.first_layer_bits, allow_none=True)
        _check_bits("last_layer_bits", self.last_layer_bits, allow_none=True)
        _check_bits("embedding_bits", self.embedding_bits, allow_none=True)
        _check_choice("weight_quantizer", self.weight_quantizer, WEIGHT_QUANTIZERS, PLANNED_WEIGHT_QUANTIZERS)
        _check_choice(
            "activation_quantizer", self.activation_quantizer, ACTIVATION_QUANTIZERS, PLANNED_ACTIVATION_QUANTIZERS
        )
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_choice("group_tables", self.group_tables, GROUP_TABLES)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(f"ADQConfig.group_size={self.group_size!r} is invalid: expected an integer >= 2 "
                             "(weights per group along the input columns, e.g. 64 or 128).")
        if self.granularity == "per_group" and self.weight_quantizer not in GROUPED_WEIGHT_QUANTIZERS:
            raise ValueError(f"ADQConfig.granularity='per_group' is not available for weight_quantizer="
                             f"{self.weight_quantizer!r} (one scale per output channel by definition); use it with "
                             f"{list(GROUPED_WEIGHT_QUANTIZERS)}.")
        _check_choice("codebook_init", self.codebook_init, CODEBOOK_INITS)
        _check_choice("codebook_update", self.codebook_update, CODEBOOK_UPDATES)
        _check_choice("activation_init", self.activation_init, RANGE_ESTIMATORS)
        if self.codebook_weighting is not None:
            _check_choice("codebook_weighting", self.codebook_weighting, CODEBOOK_WEIGHTINGS)
            if self.weight_quantizer != "adq":
                raise ValueError(f"ADQConfig.codebook_weighting={self.codebook_weighting!r} weights the fit of ADQ "
                                 f"codebooks; weight_quantizer={self.weight_quantizer!r} has none (use 'adq' or "
                                 "codebook_weighting=None).")
        if not isinstance(self.layer_bits, dict):
            raise ValueError(f"ADQConfig.layer_bits must be a dict {{module name or regex: bits}}, got {self.layer_bits!r}.")
        _check_patterns("layer_bits", self.layer_bits)
        for pattern, bits in self.layer_bits.items():
            _check_bits(f"layer_bits[{pattern!r}]", bits)
        if not isinstance(self.modules_to_not_convert, list):
            raise ValueError(
                f"ADQConfig.modules_to_not_convert must be a list of module names or regexes, "
                f"got {self.modules_to_not_convert!r}."
            )
        _check_patterns("modules_to_not_convert", self.modules_to_not_convert)
        if isinstance(self.ema_decay, bool) or not isinstance(self.ema_decay, (int, float)) or not 0 < self.ema_decay < 1:
            raise ValueError(f"ADQConfig.ema_decay={self.ema_decay!r} is invalid: expected a number in (0, 1).")
        self.ema_decay = float(self.ema_decay)
        if isinstance(self.ema_update_interval, bool) or not isinstance(self.ema_update_interval, int) or self.ema_update_interval < 1:
            raise ValueError(
                f"ADQConfig.ema_update_interval={self.ema_update_interval!r} is invalid: expected an integer >= 1."
            )
        if isinstance(self.codebook_init_iters, bool) or not isinstance(self.codebook_init_iters, int) or self.codebook_init_iters < 0:
            raise ValueError(
                f"ADQConfig.codebook_init_iters={self.codebook_init_iters!r} is invalid: expected an integer >= 0 "
                "(0 keeps the initial codebook as it is)."
            )
        if self.ptq is not None:
            _check_choice("ptq", self.ptq, PTQ_METHODS)
        if self.target_avg_bits is not None:
            if isinstance(self.target_avg_bits, bool) or not isinstance(self.target_avg_bits, (int, float)) or not (
                BITS_RANGE.start <= self.target_avg_bits <= BITS_RANGE.stop - 1
            ):
                raise ValueError(
                    f"ADQConfig.target_avg_bits={self.target_avg_bits!r} is invalid: expected None or a number from 2 to 8."
                )
            self.target_avg_bits = float(self.target_avg_bits)

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        """As the mixin's, but overrides in ``kwargs`` (``from_pretrained(..., weight_bits=3)``) go
        through the constructor's validation instead of being set on the built config unchecked."""
        fields = set(cls._field_names())
        merged = {**config_dict, **{k: v for k, v in kwargs.items() if k in fields}}
        unused = {k: v for k, v in kwargs.items() if k not in fields}
        config = cls(**merged)
        return (config, unused) if return_unused_kwargs else config

    def to_dict(self) -> Dict[str, Any]:
        names = ["quant_method"] + [n for n in self._field_names() if n not in ("quant_method",) + RUNTIME_FIELDS]
        return {name: json.loads(json.dumps(getattr(self, name))) for name in names}

    def to_json_string(self, use_diff: bool = True) -> str:
        """JSON of :meth:`to_dict` with keys in field order, not sorted: ``layer_bits`` is "first match
        wins", so sorting its keys (the mixin's ``sort_keys=True``) could change which bits a layer gets."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_json_file(self, json_file_path) -> None:
        with open(json_file_path, "w", encoding="utf-8") as writer:
            writer.write(self.to_json_string())

    def __deepcopy__(self, memo):
        """Deep copy, except the calibration data and tokenizer, which copies share (transformers deep-copies
        the model config while loading; a data set must not be duplicated)."""
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for name, value in self.__dict__.items():
            clone.__dict__[name] = value if name in RUNTIME_FIELDS else copy.deepcopy(value, memo)
        return clone

    def __eq__(self, other) -> bool:
        return isinstance(other, ADQConfig) and self.to_dict() == other.to_dict()

    def range_estimator_for(self, bits: int) -> str:
        """The range estimator of an input quantizer with ``bits`` bits (``activation_init``)."""
        return self.activation_init

    def bits_for(self, name: str) -> Optional[int]:
        """Bits from ``layer_bits`` for module ``name`` (first full match), else ``None``."""
        for pattern, bits in self.layer_bits.items():
            if name == pattern or re.fullmatch(pattern, name):
                return bits
        return None

    def is_excluded(self, name: str) -> bool:
        """Whether ``modules_to_not_convert`` keeps module ``name`` (or a parent of it) in float."""
        for pattern in self.modules_to_not_convert:
            if name == pattern or name.startswith(pattern + ".") or re.fullmatch(pattern, name):
                return True
        return False
