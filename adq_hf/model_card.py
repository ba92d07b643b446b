"""Model cards for quantized checkpoints, rendered only from what is in the checkpoint folder
(config.json, the packed safetensors header, the bit report) and from measured results.

The template is ``adq_hf/templates/model_card.md`` (also at ``model_cards/template.md`` in the
repository). Numbers that were not measured are never written: without ``results`` the card has no
accuracy section and no ``model-index``.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Optional

from .config import ADQConfig
from .serialization import CODES_SUFFIX, WEIGHTS_NAME, CheckpointError, _check_metadata

TEMPLATE_PATH = os.path.join(os.path.dirname(__file__), "templates", "model_card.md")
CARD_NAME = "README.md"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DATASET_NAMES = {"fashion_mnist": "Fashion-MNIST", "imagenet-1k": "ImageNet-1k"}


def read_checkpoint_folder(folder: str) -> Dict[str, Any]:
    """config.json and the safetensors header of an adq_hf checkpoint folder, checked.

    Raises :class:`CheckpointError` naming the problem when the folder is not an adq_hf checkpoint.
    """
    config_path, weights_path = os.path.join(folder, "config.json"), os.path.join(folder, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise CheckpointError(f"{folder} is not a saved quantized model: {os.path.basename(path)} is missing "
                                  "(write one with adq_hf.save_pretrained or model.save_pretrained).")
    with open(config_path) as fh:
        try:
            config = json.load(fh)
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{config_path} is not valid JSON ({err}).") from None
    raw = config.get("quantization_config")
    if not isinstance(raw, dict) or raw.get("quant_method") != ADQConfig().quant_method:
        method = raw.get("quant_method") if isinstance(raw, dict) else None
        raise CheckpointError(f"{config_path} has no adq quantization_config (quant_method={method!r}): "
                              "it is not an adq_hf checkpoint.")
    header = _safetensors_header(weights_path)
    layers = _check_metadata(header.pop("__metadata__", None), weights_path)
    return {"config": config, "quantization_config": ADQConfig.from_dict(raw), "header": header, "layers": layers,
            "file_bytes": os.path.getsize(weights_path)}


def _safetensors_header(path: str) -> Dict[str, Any]:
    with open(path, "rb") as fh:
        size = fh.read(8)
        if len(size) < 8:
            raise CheckpointError(f"{path} is damaged or truncated (no safetensors header); save or download it again.")
        try:
            return json.loads(fh.read(int.from_bytes(size, "little")))
        except (json.JSONDecodeError, UnicodeDecodeError, OverflowError, MemoryError):
            raise CheckpointError(f"{path} is damaged or not a safetensors file; save or download it again.") from None


def fp32_bytes(info: Dict[str, Any]) -> int:
    """Size of the same model with float32 weights: quantized layers at 4 bytes per weight, every
    other floating tensor at 4 bytes per element, quantizer state not counted (a float model has none)."""
    total = 0
    for layer in info["layers"].values():
        total += 4 * _numel(layer["shape"])
    for name, entry in info["header"].items():
        if ".weight_quantizer." in name or ".input_quantizer." in name:
            continue
        if name.endswith("." + CODES_SUFFIX) and name[: -len(CODES_SUFFIX) - 1] in info["layers"]:
            continue  # packed codes: counted above as the float weight they stand for
        if entry["dtype"].startswith(("F", "BF")):
            total += 4 * _numel(entry["shape"])
    return total


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _size(num_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes} B"


def _bit_table(folder: str, info: Dict[str, Any]) -> str:
    report = os.path.join(folder, "bit_report.md")
    if os.path.isfile(report):
        with open(report) as fh:
            return fh.read().strip()
    lines = ["| layer | params | weight bits |", "|---|---:|---:|"]
    for name, layer in info["layers"].items():
        lines.append(f"| {name} | {_numel(layer['shape'])} | {layer['bits']} |")
    return "\n".join(lines)


def average_bits_of(info: Dict[str, Any]) -> float:
    params = {n: _numel(layer["shape"]) for n, layer in info["layers"].items()}
    return sum(params[n] * layer["bits"] for n, layer in info["layers"].items()) / max(1, sum(params.values()))


def render_model_card(
    folder: str,
    repo_id: Optional[str] = None,
    results: Optional[Dict[str, Any]] = None,
    recipe_config: Optional[str] = None,
    command: Optional[str] = None,
    base_model: Optional[str] = None,
    dataset: Optional[str] = None,
) -> str:
    """The card (YAML metadata + body) for the checkpoint in ``folder``.

    ``results``: measured metrics as the recipe writes them (``fp_top1``, ``top1``, ``top5``, ...);
    ``recipe_config``: the YAML text the model was trained with; ``command``: the exact command line.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from . import __version__
    from .mixed_precision.report import AVERAGE_DEFINITION

    info = read_checkpoint_folder(folder)
    config, qconfig = info["config"], info["quantization_config"]
    is_timm = "architecture" in config
    arch = config.get("architecture") or (config.get("architectures") or [config.get("model_type", "model")])[0]
    name = repo_id.split("/")[-1] if repo_id else f"{arch}-adq"
    avg = average_bits_of(info)
    mixed = qconfig.target_avg_bits is not None or bool(qconfig.layer_bits)  # not just 8-bit first/last layers
    dataset = dataset or _recipe_dataset(recipe_config)
    dataset_name = _DATASET_NAMES.get(dataset, dataset) if dataset else None
    tags = ["quantization", "adq", "adq_hf", f"{round(avg, 2)}-bit"] + (["mixed-precision"] if mixed else [])
    tags += ["image-classification"] if is_timm else []
    eval_results = None
    if results and results.get("top1") is not None and dataset:
        eval_results = [EvalResult(task_type="image-classification", dataset_type=dataset, dataset_name=dataset_name,
                                   metric_type="accuracy", metric_name="top-1 accuracy", metric_value=results["top1"])]
        if results.get("top5") is not None:
            eval_results.append(EvalResult(task_type="image-classification", dataset_type=dataset,
                                           dataset_name=dataset_name, metric_type="top_5_accuracy",
                                           metric_name="top-5 accuracy", metric_value=results["top5"]))
    card_data = ModelCardData(
        library_name="timm" if is_timm else "transformers", tags=tags,
        base_model=base_model if base_model and _REPO_ID.match(base_model) else None,
        datasets=[dataset] if dataset and _REPO_ID.match(dataset) or dataset in _DATASET_NAMES else None,
        metrics=["accuracy"] if eval_results else None, eval_results=eval_results, model_name=name,
        pipeline_tag="image-classification" if is_timm else None,
    )
    where = repo_id or "ORG/NAME"
    if is_timm:
        snippet = (f'import adq_hf  # registers the quantized layers with timm\nimport timm\n\n'
                   f'model = timm.create_model("hf-hub:{where}", pretrained=True).eval()\n'
                   f'# or: transformers.AutoModelForImageClassification.from_pretrained("{where}") after import adq_hf')
    else:
        auto = (config.get("architectures") or ["AutoModel"])[0]
        snippet = (f'import adq_hf  # registers the "adq" quantization method with transformers\n'
                   f'from transformers import AutoModel\n\nmodel = AutoModel.from_pretrained("{where}")  # {auto}')
    act_bits = qconfig.activation_bits
    bits = sorted({layer["bits"] for layer in info["layers"].values()})
    fp32 = fp32_bytes(info)
    epoch_times = (results or {}).get("epoch_time_s") or []
    return ModelCard.from_template(
        card_data, template_path=TEMPLATE_PATH,
        model_name=name,
        summary=(f"`{arch}` quantized by [adq_hf](https://pypi.org/project/adq_hf/) to {avg:.2f} average weight bits"
                 f"{'' if act_bits is None else f' and {act_bits}-bit activations'}."),
        bits_text="/".join(str(b) for b in bits) + "-bit",
        load_snippet=snippet, config=qconfig,
        activation_text="float" if act_bits is None else f"`{qconfig.activation_quantizer}`, {act_bits} bits",
        avg_bits=avg, average_definition=AVERAGE_DEFINITION,
        checkpoint_size=_size(info["file_bytes"]), fp32_size=_size(fp32), compression=fp32 / info["file_bytes"],
        results=results, pct=lambda v: "n/a" if v is None else f"{100 * v:.2f}%",
        dataset_name=dataset_name or "the evaluation set", eval_split=_eval_split_text(recipe_config),
        epoch_time=", ".join(f"{t:.0f} s" for t in epoch_times),
        bit_table=_bit_table(folder, info), has_plot=os.path.isfile(os.path.join(folder, "bit_report.png")),
        command=command, recipe_config=(recipe_config or "").strip() or None, adq_version=__version__,
    ).content


def write_model_card(folder: str, **kwargs) -> str:
    """Render the card into ``folder/README.md``; returns its path."""
    path = os.path.join(folder, CARD_NAME)
    text = render_model_card(folder, **kwargs)
    with open(path + ".tmp", "w") as fh:
        fh.write(text)
    os.replace(path + ".tmp", path)
    return path


def _eval_split_text(recipe_config: Optional[str]) -> str:
    text = f"{_recipe_value(recipe_config, 'eval_split', 'test')} split"
    limit = _recipe_value(recipe_config, "eval_limit", None)
    return text + (f", first {limit} images" if limit else "")


def _recipe_dataset(recipe_config: Optional[str]) -> Optional[str]:
    return _recipe_value(recipe_config, "source", None)


def _recipe_value(recipe_config: Optional[str], key: str, default):
    if not recipe_config:
        return default
    import yaml

    data = (yaml.safe_load(recipe_config) or {}).get("data") or {}
    return data.get(key, default) or default
