"""Calibration at load: ``from_pretrained(..., quantization_config=ADQConfig(ptq=..., calibration_dataset=...,
tokenizer=...))`` runs block-by-block PTQ while loading (real MiniLM weights and sentences); the
config still serializes (no data or tokenizer in config.json) and the checkpoint reloads
pre-quantized. timm's create_model does the same."""

import copy
import json

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import adq_hf
from adq_hf import ADQConfig
from adq_hf.data import minilm_path
from adq_hf.ptq import quantize

pytestmark = pytest.mark.usefixtures("one_thread")

SENTENCES = ["The cat sat quietly on the warm windowsill.", "Quantization reduces the memory a model needs.",
             "Rain is expected in the northern valleys tomorrow.", "She paid for the groceries with cash."]
# two of MiniLM's six layers (test time)
FIELDS = dict(weight_bits=3, granularity="per_channel", codebook_init_iters=3,
              modules_to_not_convert=[r"encoder\.layer\.[2-5]\..*", "pooler"])


@pytest.mark.slow
def test_from_pretrained_runs_ptq_while_loading_and_saves_a_plain_config(tmp_path):
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = ADQConfig(**FIELDS, ptq="gptq", calibration_dataset=SENTENCES)  # tokenizer: the checkpoint's own
    model = AutoModel.from_pretrained(path, quantization_config=config).eval()
    assert model.ptq_plan["blockwise"] and len(model.ptq_report) == 12
    expected = quantize(AutoModel.from_pretrained(path, quantization_config=ADQConfig(**FIELDS)).eval(), SENTENCES,
                        method="gptq", tokenizer=tokenizer, progress=False)
    for (name, layer), (_, other) in zip(adq_hf.quantized_layers(model), adq_hf.quantized_layers(expected)):
        assert torch.equal(layer.latent_weight(), other.latent_weight()), name
    loaded_config = model.config.quantization_config
    assert loaded_config.calibration_dataset is None and loaded_config.tokenizer is None  # dropped after PTQ
    assert config.calibration_dataset is SENTENCES  # the caller's config is not touched

    model.save_pretrained(tmp_path)
    saved = json.load(open(tmp_path / "config.json"))["quantization_config"]
    assert saved["ptq"] == "gptq" and "calibration_dataset" not in saved and "tokenizer" not in saved
    batch = tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")
    reloaded = AutoModel.from_pretrained(tmp_path).eval()  # pre-quantized: no PTQ, no data needed
    assert not hasattr(reloaded, "ptq_report")
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).last_hidden_state, model(**batch).last_hidden_state)


def test_ptq_at_load_needs_data_and_a_known_method():
    with pytest.raises(ValueError, match=r"ADQConfig.ptq='gtpq' is invalid: expected one of \['gptq', 'obq', 'rtn', 'sa'\]"):
        ADQConfig(ptq="gtpq")
    config = ADQConfig(weight_bits=4, ptq="sa", calibration_dataset=SENTENCES, tokenizer=object())
    assert "calibration_dataset" not in config.to_dict() and "tokenizer" not in config.to_dict()
    assert config == ADQConfig(weight_bits=4, ptq="sa") and ADQConfig.from_dict(config.to_dict()).ptq == "sa"
    clone = copy.deepcopy(config)  # transformers deep-copies configs while loading: the data is shared, not copied
    assert clone.calibration_dataset is SENTENCES and clone.tokenizer is config.tokenizer and clone == config
    assert clone.layer_bits is not config.layer_bits
    with pytest.raises(ValueError, match=r"ADQConfig.ptq='sa' runs PTQ while loading float weights and needs "
                                         r"calibration_dataset="):
        AutoModel.from_pretrained(minilm_path(), quantization_config=ADQConfig(**FIELDS, ptq="sa"))


def test_timm_create_model_runs_ptq_with_the_config():
    import timm

    batches = [torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    model = timm.create_model("resnet20_cifar", num_classes=10, in_chans=1, quantization_config=ADQConfig(
        weight_bits=3, codebook_init_iters=2, ptq="gptq", calibration_dataset=batches))
    assert len(model.ptq_report) == len(adq_hf.quantized_layers(model)) and model.ptq_plan["blocks"] == 9
