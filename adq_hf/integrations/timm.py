"""timm glue: ``create_model(..., quantization_config=...)``, pre-quantized ``local-dir:`` /
``hf-hub:`` checkpoints, and ``save_pretrained`` in timm's ``save_for_hf`` layout.

timm has no plugin hook, so ``import adq_hf`` replaces ``timm.create_model`` (and
``timm.models.create_model``) with :func:`create_model`, which only acts when a quantization config
is given or the checkpoint carries one; everything else goes to timm unchanged.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Tuple

import timm
import timm.models
from torch import nn

from ..config import ADQConfig
from ..serialization import WEIGHTS_NAME, CheckpointError, load_file, save_file
from ..ptq import quantize_at_load
from ..quantize import quantize_model

_timm_create_model = timm.models._factory.create_model


def _source(model_name: str) -> Tuple[Optional[str], str, Optional[str]]:
    """``(scheme, location, revision)`` for ``hf-hub:org/name[@rev]`` and ``local-dir:PATH``."""
    for scheme in ("hf-hub:", "local-dir:"):
        if model_name.startswith(scheme):
            location = model_name[len(scheme):]
            revision = None
            if scheme == "hf-hub:" and "@" in location:
                location, revision = location.split("@", 1)
            return scheme[:-1], location, revision
    return None, model_name, None


def _fetch(scheme: str, location: str, filename: str, revision: Optional[str], cache_dir=None) -> str:
    if scheme == "local-dir":
        path = Path(location) / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: a local-dir checkpoint needs {filename}.")
        return str(path)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        return hf_hub_download(location, filename, revision=revision, cache_dir=cache_dir)
    except RemoteEntryNotFoundError:
        at = f" at revision {revision}" if revision else ""
        raise CheckpointError(f"hf-hub:{location}{at} has no {filename}: the upload is incomplete; push the model "
                              "again (adq_hf.push_to_hub or adq-hf push).") from None


def checkpoint_quantization_config(model_name: str, cache_dir=None) -> Optional[ADQConfig]:
    """The ``quantization_config`` in a ``local-dir:``/``hf-hub:`` config.json, if it has one."""
    scheme, location, revision = _source(model_name)
    if scheme is None:
        return None
    with open(_fetch(scheme, location, "config.json", revision, cache_dir)) as fh:
        config = json.load(fh)
    raw = config.get("quantization_config")
    if raw is None:
        return None
    method = raw.get("quant_method")
    if method != "adq":
        raise CheckpointError(
            f"{model_name} is quantized with quant_method={method!r}, which adq_hf does not read "
            "(adq_hf reads 'adq')."
        )
    return ADQConfig.from_dict(raw)


def create_model(
    model_name: str,
    pretrained: Optional[bool] = None,
    quantization_config: Optional[ADQConfig] = None,
    deploy: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model`` that quantizes.

    * A float model name plus ``quantization_config``: timm builds it (loading pretrained weights
      first when ``pretrained=True``), then the quantizers are initialised from those weights.
    * A ``local-dir:``/``hf-hub:`` checkpoint whose config.json has a ``quantization_config``: the
      architecture is built, quantized with that config and the packed weights are loaded (unless
      ``pretrained=False`` is passed explicitly: then only the architecture is built).
    * ``deploy=True`` (such a checkpoint only): the packed codes are loaded as they are into deploy
      mode (``adq_hf.convert_for_inference``, docs/deploy.md), never decoded into float weights.
    """
    saved_config = checkpoint_quantization_config(model_name, kwargs.get("cache_dir"))
    if deploy and (saved_config is None or pretrained is False):
        raise ValueError(
            f"deploy=True loads the packed weights of an adq_hf checkpoint (local-dir:/hf-hub: with a "
            f"quantization_config), and {model_name!r} " + ("is not one" if saved_config is None else
                                                              "is built with pretrained=False (no weights)")
            + "; for a model quantized in this process, call adq_hf.convert_for_inference(model) after calibration."
        )
    if saved_config is None:
        model = _timm_create_model(model_name, pretrained=bool(pretrained), **kwargs)
        if quantization_config is not None:
            config = _as_config(quantization_config)
            quantize_model(model, config)
            if config.ptq is not None:
                quantize_at_load(model, config)
        return model
    if quantization_config is not None and _as_config(quantization_config) != saved_config:
        warnings.warn(
            f"{model_name} is already quantized; its own quantization_config is used and the one passed is ignored.",
            stacklevel=2,
        )
    model = _timm_create_model(model_name, pretrained=False, **kwargs)
    quantize_model(model, saved_config, init_from_weights=pretrained is False)
    if deploy:
        from ..deploy import convert_for_loading

        convert_for_loading(model)  # the codes go straight into the deployed layers' packed buffers
    if pretrained is not False:
        scheme, location, revision = _source(model_name)
        load_file(model, _fetch(scheme, location, WEIGHTS_NAME, revision, kwargs.get("cache_dir")))
    return model


def _as_config(config) -> ADQConfig:
    if isinstance(config, ADQConfig):
        return config
    if isinstance(config, dict):
        return ADQConfig.from_dict(config)
    raise TypeError(f"quantization_config must be an adq_hf.ADQConfig or a dict, got {type(config).__name__}.")


def save_pretrained(
    model: nn.Module, save_directory: str, model_config: Optional[dict] = None, data_config: Optional[dict] = None
) -> None:
    """Write a quantized timm model as ``config.json`` + packed ``model.safetensors``.

    The layout is timm's ``save_for_hf``; ``config.json`` has a top-level ``quantization_config``,
    and ``num_classes`` only at the top level (in ``model_args`` it breaks transformers' TimmWrapper).
    ``data_config`` (timm's ``input_size``/``mean``/``std``/...) records the preprocessing used.
    """
    from timm.models._hub import save_config_for_hf
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):  # transformers models save through their own quantizer hooks
        model.save_pretrained(save_directory)
        return
    config = getattr(model, "quantization_config", None)
    if not isinstance(config, ADQConfig):
        raise ValueError("save_pretrained expects a model quantized by adq_hf (quantize_model or create_model).")
    os.makedirs(save_directory, exist_ok=True)
    save_file(model, os.path.join(save_directory, WEIGHTS_NAME))
    extra = dict(model_config or {})
    extra["quantization_config"] = config.to_dict()
    config_path = os.path.join(save_directory, "config.json")
    save_config_for_hf(model, config_path + ".tmp", model_config=extra, data_config=data_config)
    with open(config_path + ".tmp") as fh:
        hf_config = json.load(fh)
    hf_config.get("model_args", {}).pop("num_classes", None)
    with open(config_path + ".tmp", "w") as fh:
        json.dump(hf_config, fh, indent=2)
    os.replace(config_path + ".tmp", config_path)


def install() -> None:
    """Route ``timm.create_model`` through :func:`create_model` (idempotent)."""
    timm.create_model = create_model
    timm.models.create_model = create_model
