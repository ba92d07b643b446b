"""transformers models as users load them (issue 16): tied embeddings, PEFT/LoRA on a quantized base,
bf16/fp16 (``dtype=`` and the older ``torch_dtype=``), ``device_map`` and sharded checkpoints; all
through ``from_pretrained(..., quantization_config=ADQConfig(...))`` and ``save_pretrained``."""

import json
import os
import warnings

import pytest
import torch
from safetensors import safe_open

import adq_hf
from adq_hf import ADQConfig
from tiny_transformers import ZOO, save_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

TIED = ["gpt2", "llama-tied", "gemma", "opt", "t5"]


def tensors_in(folder):
    names = {}
    for file in os.listdir(folder):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(folder, file), "pt") as f:
                names.update({k: f.get_slice(k).get_shape() for k in f.keys()})
    return names


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@pytest.mark.parametrize("name", TIED)
def test_tied_embeddings_quantize_save_and_reload(name, tmp_path):
    """On main, saving then loading a tied model failed in transformers' mark_tied_weights_as_initialized
    ("`weight` is not an nn.Parameter"): the tied LM head had been quantized on its own."""
    case = ZOO[name]
    path = save_tiny(name, tmp_path / "float")
    batch = case.inputs(seed=0)
    head = "lm_head"
    # default: embeddings float, so the tied head stays float too, named in a warning
    with pytest.warns(UserWarning, match=rf"{head} \(weight tied to .*which stays float; set ADQConfig.embedding_bits"):
        model = case.auto.from_pretrained(path, quantization_config=ADQConfig(weight_bits=4))
    assert not adq_hf.nn.is_quantized_layer(model.get_submodule(head))
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "w4")
    assert torch.equal(logits(case.auto.from_pretrained(tmp_path / "w4"), batch), expected)

    # embedding_bits: the tied pair shares one quantized weight, stored once, trained once
    config = ADQConfig(weight_bits=4, embedding_bits=4, activation_bits=8)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="adq_hf leaves")
        model = case.auto.from_pretrained(path, quantization_config=config)
    embedding = model.get_input_embeddings()
    assert model.get_submodule(head).tied_to is embedding and embedding.weight_bits == 8  # the head's 8 bits
    model.train()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    before = embedding.latent_weight().detach().clone()
    model(**batch).loss.backward()
    optimiser.step()
    assert not torch.equal(before, embedding.latent_weight())
    assert model.get_submodule(head).latent_weight() is embedding.latent_weight()
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "tied")
    stored = tensors_in(tmp_path / "tied")
    embedding_name = next(n for n, m in model.named_modules() if m is embedding)
    assert f"{head}.weight" not in stored and not any(k.startswith(f"{head}.weight_quantizer") for k in stored)
    assert stored[f"{embedding_name}.weight"] == [embedding.latent_weight().numel() * 8 // 8]  # packed 8-bit codes
    reloaded = case.auto.from_pretrained(tmp_path / "tied")
    assert reloaded.get_submodule(head).tied_to is reloaded.get_input_embeddings()
    assert torch.equal(logits(reloaded, batch), expected)
    adq_hf.convert_for_inference(reloaded)
    assert torch.equal(logits(reloaded, batch), expected)


@pytest.mark.parametrize("name, targets", [("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"])])
def test_peft_lora_on_a_quantized_base_trains_saves_and_loads(name, targets, tmp_path):
    """As on bitsandbytes/HQQ bases: the quantized base is frozen (weights and codebooks), the adapters
    train; the adapter saves alone and loads onto the pre-quantized base. On main the frozen base's
    codebooks still took an EMA step in the first training forward, so the reloaded model differed."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import Trainer, TrainingArguments

    case = ZOO[name]
    path = save_tiny(name, tmp_path / "float")
    base = case.auto.from_pretrained(path, quantization_config=ADQConfig(weight_bits=4, embedding_bits=4))
    base.save_pretrained(tmp_path / "base")
    base = case.auto.from_pretrained(tmp_path / "base")
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (peft: fan_in_fan_out is set for GPT-2's Conv1D)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    batch = case.inputs(seed=0)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["labels"]))]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], max_steps=3,
                             learning_rate=1e-2, per_device_train_batch_size=2, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=rows).train()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # (LoRA B starts at zero)
    after = {k.replace(".base_layer", ""): v for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    assert after.keys() == frozen.keys()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen), [k for k in frozen if not torch.equal(frozen[k], after[k])]
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    assert all("lora_" in k for k in tensors_in(tmp_path / "adapter"))  # the adapter alone
    reloaded = PeftModel.from_pretrained(case.auto.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert torch.equal(logits(reloaded, batch), expected)


@pytest.mark.parametrize("option, dtype", [("dtype", torch.bfloat16), ("torch_dtype", torch.float16)])
def test_half_precision_quantize_train_save_reload(option, dtype, tmp_path):
    """Weights in the model's dtype, quantizer state in float32 (docs/methods.md); a training step, then
    save and reload give the same outputs. On main the codebooks were bf16 and the reload differed."""
    case = ZOO["llama-tied"]
    path = save_tiny("llama-tied", tmp_path / "float")
    config = ADQConfig(weight_bits=4, embedding_bits=4, activation_bits=8)
    model = case.auto.from_pretrained(path, quantization_config=config, **{option: dtype})
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.latent_weight().dtype == dtype and model.lm_head.latent_weight().dtype == dtype
    assert layer.weight_quantizer.codebook.dtype == torch.float32
    batch = case.inputs(seed=0)
    adq_hf.calibrate_activations(model, [batch])
    assert layer.input_quantizer.scale.dtype == torch.float32
    model.train()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        model(**batch).loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    assert int(layer.weight_quantizer.num_updates) == 1
    expected = logits(model, batch)
    assert expected.dtype == dtype
    model.save_pretrained(tmp_path / "half")
    for reload_options in ({option: dtype}, {}):  # config.json records the dtype
        reloaded = case.auto.from_pretrained(tmp_path / "half", **reload_options)
        assert reloaded.model.layers[0].self_attn.q_proj.weight_quantizer.codebook.dtype == torch.float32
        assert torch.equal(logits(reloaded, batch), expected)
    adq_hf.convert_for_inference(reloaded)
    assert torch.equal(logits(reloaded, batch), expected)


@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_device_map_and_sharded_checkpoints(device_map, tmp_path):
    """GPT-2 (Conv1D, tied head): device_map on load and reload; a checkpoint in shards smaller than the
    model with the safetensors index loads back equal."""
    case = ZOO["gpt2"]
    path = save_tiny("gpt2", tmp_path / "float")
    config = ADQConfig(weight_bits=4, embedding_bits=4)
    model = case.auto.from_pretrained(path, quantization_config=config, device_map=device_map)
    batch = case.inputs(seed=0)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    files = sorted(os.listdir(tmp_path / "sharded"))
    shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    with open(tmp_path / "sharded" / "model.safetensors.index.json") as fh:
        weight_map = json.load(fh)["weight_map"]
    assert set(weight_map) == set(tensors_in(tmp_path / "sharded"))
    reloaded = case.auto.from_pretrained(tmp_path / "sharded", device_map=device_map)
    assert len(adq_hf.quantized_layers(reloaded)) == len(adq_hf.quantized_layers(model))
    assert torch.equal(logits(reloaded, batch), expected)


def test_a_float_checkpoint_that_also_stores_the_tied_copy_loads_cleanly(tmp_path):
    """Older checkpoints store the tied LM head's weight too: adq_hf ties it to the embedding itself, so
    that copy is neither loaded nor reported as unexpected."""
    from safetensors.torch import load_file, save_file

    case = ZOO["gpt2"]
    path = save_tiny("gpt2", tmp_path / "float")
    state = load_file(os.path.join(path, "model.safetensors"))
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    model, info = case.auto.from_pretrained(path, quantization_config=ADQConfig(weight_bits=4, embedding_bits=4),
                                            output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    assert model.lm_head.tied_to is model.transformer.wte
    assert model.lm_head.latent_weight() is model.transformer.wte.latent_weight()


def test_quantize_model_after_loading_a_tied_model_saves_once_and_reloads(tmp_path):
    """quantize_model on a loaded (already tied) model: the same tie, the same checkpoint layout."""
    case = ZOO["gpt2"]
    model = case.auto.from_pretrained(save_tiny("gpt2", tmp_path / "float"))
    adq_hf.quantize_model(model, ADQConfig(weight_bits=3, embedding_bits=4, last_layer_bits=4))
    assert model.lm_head.tied_to is model.transformer.wte and model.transformer.wte.weight_bits == 4
    batch = case.inputs(seed=0)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "q")
    assert "lm_head.weight" not in tensors_in(tmp_path / "q")
    reloaded = case.auto.from_pretrained(tmp_path / "q")
    assert reloaded.lm_head.tied_to is reloaded.transformer.wte
    assert torch.equal(logits(reloaded, batch), expected)
