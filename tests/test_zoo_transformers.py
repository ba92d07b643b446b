"""Model zoo, transformers side (issue 16): every architecture from a tiny random-weight checkpoint,
through the public entry point ``from_pretrained(..., quantization_config=ADQConfig(...))``:

* W8A8 (default quantizers) after ``adq_hf.calibrate_activations`` on another batch: cosine of the
  output to the float model's >= 0.995; forward and backward train every quantized layer;
* W4 with embeddings (``embedding_bits=4``): ``save_pretrained`` then ``from_pretrained`` reproduce
  the outputs exactly (tied embeddings stored once); deploy mode (``adq_hf.convert_for_inference``)
  equals the fake-quant model, ``generate()`` too;
* one ``transformers.Trainer`` step.

With ``ADQ_HF_ZOO_REPORT=<dir>`` each case writes ``<dir>/transformers-<model>.json`` for the
supported-architectures table (docs/architectures.md)."""

import json
import os
import warnings

import pytest
import torch
from transformers import Trainer, TrainingArguments

import adq_hf
from adq_hf import ADQConfig
from adq_hf.nn import WEIGHT_LAYER_TYPES, is_quantized_layer
from tiny_transformers import ZOO, save_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

MIN_W8A8_COSINE = 0.995
# models whose W8A8 cosine misses MIN_W8A8_COSINE with today's activation initialisation: {name: measured}
W8A8_XFAIL = {}


def float_class_name(layer) -> str:
    """The transformers/torch class a quantized layer was made from (``QuantFalconLinear`` -> ``FalconLinear``)."""
    return next(c.__name__ for c in type(layer).__mro__ if not c.__module__.startswith("adq_hf"))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def trainer_step(model, batch, folder) -> float:
    """One optimiser step through transformers' Trainer; returns the training loss."""
    size = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
    args = TrainingArguments(output_dir=str(folder), use_cpu=True, report_to=[], max_steps=1, learning_rate=1e-3,
                             per_device_train_batch_size=size, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                             remove_unused_columns=False)
    rows = [{k: v[i] for k, v in batch.items() if torch.is_tensor(v)} for i in range(size)]
    extra = {k: v for k, v in batch.items() if not torch.is_tensor(v)}  # CLIP's return_loss

    def collate(items):
        return {**{k: torch.stack([item[k] for item in items]) for k in items[0]}, **extra}

    result = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate).train()
    return result.training_loss


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo(name, tmp_path):
    case = ZOO[name]
    path = save_tiny(name, tmp_path / "float")
    record = {"suite": "transformers", "model": name, "family": case.family, "notes": case.notes}
    calibration, batch = case.inputs(seed=0), case.inputs(seed=1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    # W8A8: near-lossless after calibration; trains
    float_model = case.auto.from_pretrained(path).eval()
    with torch.no_grad():
        expected = case.output(float_model(**inputs))
    model = case.auto.from_pretrained(path, quantization_config=ADQConfig(weight_bits=8, activation_bits=8))
    adq_hf.calibrate_activations(model, [calibration])
    model.eval()
    with torch.no_grad():
        record["w8a8_cosine"] = cosine(case.output(model(**inputs)), expected)
    model.train()
    model(**batch).loss.backward()
    untrained = [n for n, m in adq_hf.quantized_layers(model) if m.latent_weight().requires_grad
                 and m.latent_weight().grad is None]
    assert adq_hf.quantized_layers(model) and not untrained, untrained

    # W4 with embeddings: save/reload exactly, deploy, generate, Trainer
    config = ADQConfig(weight_bits=4, embedding_bits=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (transformers' own deprecation notes)
        w4 = case.auto.from_pretrained(path, quantization_config=config).eval()
    layers = adq_hf.quantized_layers(w4)
    record["layer_types"] = {}
    for _, layer in layers:
        key = float_class_name(layer)
        record["layer_types"][key] = record["layer_types"].get(key, 0) + 1
    record["float_layers"] = [n for n, m in w4.named_modules()
                              if isinstance(m, WEIGHT_LAYER_TYPES) and n and not is_quantized_layer(m)]
    with torch.no_grad():
        w4_out = case.output(w4(**inputs))
    w4.save_pretrained(tmp_path / "w4")
    reloaded = case.auto.from_pretrained(tmp_path / "w4").eval()
    with torch.no_grad():
        record["w4_reload_equal"] = torch.equal(case.output(reloaded(**inputs)), w4_out)
    record["generate"] = None
    if case.generates:
        prompt = {k: v for k, v in inputs.items() if not k.startswith("decoder_")}
        options = dict(min_new_tokens=3, max_new_tokens=3, do_sample=False, pad_token_id=0)
        fake_quant_tokens = reloaded.generate(**prompt, **options)
    adq_hf.convert_for_inference(reloaded, exact=True)  # bit for bit (the fused kernels reassociate sums)
    with torch.no_grad():
        record["deploy_equal"] = torch.equal(case.output(reloaded(**inputs)), w4_out)
    if case.generates:
        deployed_tokens = reloaded.generate(**prompt, **options)
        # decoder-only: the prompt and 3 new tokens; encoder-decoders: 3 tokens at least (Whisper drops its start token)
        length = fake_quant_tokens.shape[-1]
        enough = length == prompt["input_ids"].shape[-1] + 3 if case.family == "causal-lm" else length >= 3
        record["generate"] = enough and torch.equal(fake_quant_tokens, deployed_tokens)
    before = {n: m.latent_weight().detach().clone() for n, m in adq_hf.quantized_layers(w4)}
    loss = trainer_step(w4, batch, tmp_path / "trainer")
    changed = [n for n, m in adq_hf.quantized_layers(w4) if not torch.equal(before[n], m.latent_weight())]
    record["trainer_step"] = bool(torch.isfinite(torch.tensor(loss)) and changed)

    report = os.environ.get("ADQ_HF_ZOO_REPORT")
    if report:
        os.makedirs(report, exist_ok=True)
        with open(os.path.join(report, f"transformers-{name}.json"), "w") as fh:
            json.dump(record, fh, indent=1, sort_keys=True)

    assert record["w4_reload_equal"] and record["deploy_equal"] and record["trainer_step"], record
    assert record["generate"] in (None, True), record
    assert sum(record["layer_types"].values()) == len(layers) and not record["float_layers"], record
    if name in W8A8_XFAIL:
        pytest.xfail(f"W8A8 cosine {record['w8a8_cosine']:.4f} (measured {W8A8_XFAIL[name]}): activation init: "
                     "zoo-vision helper")
    assert record["w8a8_cosine"] >= MIN_W8A8_COSINE, record
