"""Tiny random-weight transformers models (the same classes and code paths as the real checkpoints),
their inputs and the tensor to compare, for tests/test_zoo_transformers.py and
tests/test_transformers_models.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict

import torch
import transformers as tf

VOCAB = 96


@dataclass
class TinyModel:
    name: str
    family: str  # "causal-lm", "masked-lm", "seq2seq", "image-classification", "clip", "speech-seq2seq"
    make: Callable[[], tf.PreTrainedModel]
    auto: type  # the Auto class that loads it back
    notes: str = ""
    extra: Dict = field(default_factory=dict)

    @property
    def generates(self) -> bool:
        return self.family in ("causal-lm", "seq2seq", "speech-seq2seq")

    def inputs(self, seed: int, batch: int = 2) -> Dict[str, torch.Tensor]:
        """A batch of model inputs with labels (a loss comes out), from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, VOCAB, (batch, 8), generator=g)
        if self.family in ("causal-lm", "masked-lm"):
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        if self.family == "seq2seq":  # decoder inputs too: calibration batches leave the labels out
            labels = torch.randint(3, VOCAB, (batch, 5), generator=g)
            return {"input_ids": ids, "decoder_input_ids": labels, "labels": labels}
        if self.family == "image-classification":
            return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g),
                    "labels": torch.randint(0, 4, (batch,), generator=g)}
        if self.family == "clip":
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "pixel_values": torch.randn(batch, 3, 32, 32, generator=g), "return_loss": True}
        if self.family == "speech-seq2seq":
            labels = torch.randint(3, VOCAB, (batch, 5), generator=g)
            return {"input_features": torch.randn(batch, 8, 32, generator=g), "decoder_input_ids": labels,
                    "labels": labels}
        raise ValueError(self.family)

    @staticmethod
    def output(out) -> torch.Tensor:
        """The tensor compared between float and quantized models (CLIP: both embeddings)."""
        if getattr(out, "text_embeds", None) is not None:
            return torch.cat([out.text_embeds.flatten(), out.image_embeds.flatten()])
        for key in ("logits",):
            if getattr(out, key, None) is not None:
                return getattr(out, key)
        return out[0]


def _decoder(config_cls, **kwargs):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base.update(kwargs)
    return config_cls(**base)


def _make(model_cls, config_fn):
    def make():
        torch.manual_seed(0)
        return model_cls(config_fn())
    return make


_BERT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, pad_token_id=0)
_VIT = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4)

ZOO: Dict[str, TinyModel] = {m.name: m for m in [
    TinyModel("gpt2", "causal-lm", _make(tf.GPT2LMHeadModel, lambda: tf.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2,
        pad_token_id=0)), tf.AutoModelForCausalLM, "Conv1D layers; LM head tied to wte"),
    TinyModel("llama", "causal-lm", _make(tf.LlamaForCausalLM, lambda: _decoder(tf.LlamaConfig)),
              tf.AutoModelForCausalLM, "untied LM head"),
    TinyModel("llama-tied", "causal-lm", _make(tf.LlamaForCausalLM, lambda: _decoder(
        tf.LlamaConfig, tie_word_embeddings=True)), tf.AutoModelForCausalLM,
              "tie_word_embeddings=True (Llama-3.2-1B, SmolLM)"),
    TinyModel("qwen2", "causal-lm", _make(tf.Qwen2ForCausalLM, lambda: _decoder(
        tf.Qwen2Config, tie_word_embeddings=True)), tf.AutoModelForCausalLM, "tied, as Qwen2.5-0.5B"),
    TinyModel("mistral", "causal-lm", _make(tf.MistralForCausalLM, lambda: _decoder(tf.MistralConfig)),
              tf.AutoModelForCausalLM),
    TinyModel("gemma", "causal-lm", _make(tf.GemmaForCausalLM, lambda: _decoder(tf.GemmaConfig, head_dim=8)),
              tf.AutoModelForCausalLM, "scaled word embedding (an Embedding subclass) tied to the LM head"),
    TinyModel("phi3", "causal-lm", _make(tf.Phi3ForCausalLM, lambda: _decoder(tf.Phi3Config)),
              tf.AutoModelForCausalLM, "fused qkv and gate_up projections"),
    TinyModel("opt", "causal-lm", _make(tf.OPTForCausalLM, lambda: tf.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
              tf.AutoModelForCausalLM, "learned positional embedding subclass; LM head tied"),
    TinyModel("falcon", "causal-lm", _make(tf.FalconForCausalLM, lambda: tf.FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, bos_token_id=1,
        eos_token_id=2, pad_token_id=0)), tf.AutoModelForCausalLM, "FalconLinear (a Linear subclass); LM head tied"),
    TinyModel("bert", "masked-lm", _make(tf.BertForMaskedLM, lambda: tf.BertConfig(**_BERT)),
              tf.AutoModelForMaskedLM, "MLM decoder tied to the word embedding"),
    TinyModel("roberta", "masked-lm", _make(tf.RobertaForMaskedLM, lambda: tf.RobertaConfig(**{
        **_BERT, "pad_token_id": 1, "max_position_embeddings": 72})), tf.AutoModelForMaskedLM),
    TinyModel("distilbert", "masked-lm", _make(tf.DistilBertForMaskedLM, lambda: tf.DistilBertConfig(
        vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64,
        pad_token_id=0)), tf.AutoModelForMaskedLM),
    TinyModel("t5", "seq2seq", _make(tf.T5ForConditionalGeneration, lambda: tf.T5Config(
        vocab_size=VOCAB, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=2)), tf.AutoModelForSeq2SeqLM,
              "one embedding shared by encoder, decoder and LM head; relative attention bias embeddings"),
    TinyModel("vit", "image-classification", _make(tf.ViTForImageClassification, lambda: tf.ViTConfig(
        **_VIT, num_labels=4)), tf.AutoModelForImageClassification, "Conv2d patch embedding"),
    TinyModel("clip", "clip", _make(tf.CLIPModel, lambda: tf.CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, projection_dim=16),
        vision_config=dict(**_VIT, projection_dim=16), projection_dim=16)), tf.AutoModel),
    TinyModel("whisper", "speech-seq2seq", _make(tf.WhisperForConditionalGeneration, lambda: tf.WhisperConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
        max_source_positions=16, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, begin_suppress_tokens=None, suppress_tokens=None)),
              tf.AutoModelForSpeechSeq2Seq, "nn.Conv1d front-end; decoder embedding tied to proj_out"),
]}


def save_tiny(model_name: str, folder) -> str:
    """Save the tiny float model to ``folder`` (a checkpoint as the Hub serves it); returns the path."""
    model = ZOO[model_name].make()
    model.save_pretrained(str(folder))
    return str(folder)
