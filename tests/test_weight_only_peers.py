"""B5's weight-only peers and bits-per-weight accounting (benchmarks/weight_only_peers.py): stored bytes
against hand-computed values for small layers, GPTQ per group against GPTQ's own column-by-column
sweep, the stored tensors decode to the weights the model runs with, size classes."""

import glob
import os
import sys

import pytest
import torch
from transformers import AutoModel, BertConfig, BertModel

import adq_hf
from adq_hf import ADQConfig
from adq_hf.packing import unpack_codes
from adq_hf.ptq import collect_hessian, inverse_hessian, layer_error, nearest_level, prepare_hessian

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import weight_only_peers as peers  # noqa: E402
from common import by_size_class, size_class, size_frontier, unsized_rows  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def layer_weight(rows=4, cols=128, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


def hessian(cols, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(600, cols, generator=g, dtype=torch.float64) @ torch.randn(cols, cols, generator=g, dtype=torch.float64)
    return 2 * x.T @ x / 600


# ---------------------------------------------------------------------------------------------
# Bytes per weight, by hand, for a [4, 128] layer (512 weights)
# ---------------------------------------------------------------------------------------------
def test_uniform_grid_bytes_by_hand():
    w = layer_weight()
    # groups of 64 at 3 bits: 512 codes * 3 bits = 192 bytes; 8 groups: fp16 scales 16 bytes, 3-bit zeros 3 bytes
    _, grouped = peers.rtn(w, 3, group_size=64)
    assert {k: v.numel() * v.element_size() for k, v in grouped.counted.items()} == {"qweight": 192, "scales": 16,
                                                                                    "qzeros": 3}
    assert peers.bits_per_weight({"l": grouped}, 512) == pytest.approx(211 * 8 / 512)
    # per channel, symmetric at 4 bits: 256 bytes of codes + 4 fp16 scales, no zero points
    _, symmetric = peers.rtn(w, 4, symmetric=True)
    assert symmetric.counted_bytes == 256 + 8 and "qzeros" not in symmetric.counted
    assert peers.bits_per_weight({"l": symmetric}, 512) == pytest.approx(4.125)


@pytest.mark.parametrize("bits, axis, w_q_bytes", [(4, 1, 256), (3, 1, 256), (2, 1, 128), (3, 0, 224)])
def test_hqq_bytes_by_hand(bits, axis, w_q_bytes):
    """HQQ packs 4-bit as 2 per byte, 2-bit as 4 per byte, 3-bit as 10 per int32 along its first dimension:
    axis=1 views the weight as [8 groups, 64], one int32 row of 64 (256 bytes, 4.0 bits each here); axis=0
    as [64, 8 groups], 7 int32 rows of 8 (224 bytes). Float16 scale and zero per group: 8 * 2 * 2 = 32 bytes."""
    q, storage = peers.hqq(layer_weight(), bits, group_size=64, axis=axis)
    assert storage.counted["scale"].dtype == storage.counted["zero"].dtype == torch.float16
    assert storage.counted_bytes == w_q_bytes + 32
    assert storage.header_bytes > 0 and "bias" not in storage.header  # nbits, shape, packing name, ...
    assert q.shape == (4, 128) and (q - layer_weight()).pow(2).mean() < layer_weight().pow(2).mean() / 2


def test_bitsandbytes_bytes_by_hand():
    """NF4: 256 bytes of codes, 8 fp32 absmax (32 bytes) and the 16-entry fp32 table (64 bytes). With double
    quantization the absmax values are 8-bit (8 bytes) plus one fp32 absmax per 256 blocks (4 bytes) and the
    256-entry fp32 table they index (1,024 bytes)."""
    _, nf4 = peers.bnb(layer_weight(), 4, quant_type="nf4")
    assert nf4.counted_bytes == 256 + 32 + 64
    assert list(nf4.header) == ["quant_state.bitsandbytes__nf4"]  # the JSON quant state
    _, nf4_dq = peers.bnb(layer_weight(), 4, quant_type="nf4", double_quant=True)
    assert nf4_dq.counted_bytes == 256 + 8 + 64 + 4 + 1024
    with pytest.raises(ValueError, match="4-bit formats"):
        peers.bnb(layer_weight(), 3)


def test_adq_checkpoint_bytes_by_hand(tmp_path):
    """A per-channel W3 query layer [32, 32] of a real (tiny) BERT saved by save_pretrained: 1,024 codes * 3 bits
    = 384 bytes plus 32 codebooks of 8 fp32 levels (1,024 bytes): 11 bits per weight on a layer this small."""
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "fp")
    model = AutoModel.from_pretrained(tmp_path / "fp", quantization_config=ADQConfig(
        weight_bits=3, activation_bits=None, granularity="per_channel"))
    model.save_pretrained(tmp_path / "q")
    layers = {n: m.weight_numel for n, m in adq_hf.quantized_layers(model)}
    stored = peers.adq_checkpoint_storage(sorted(glob.glob(str(tmp_path / "q" / "*.safetensors"))), layers)
    query = stored["encoder.layer.0.attention.self.query"]
    assert sorted(query.counted) == ["weight", "weight_quantizer.codebook"]
    assert query.counted_bytes == 384 + 1024
    assert sorted(query.header) == ["weight_quantizer.num_steps", "weight_quantizer.num_updates"]
    assert peers.bits_per_weight({"q": query}, 1024) == pytest.approx(11.0)
    with pytest.raises(ValueError, match="not an adq_hf checkpoint"):
        peers.adq_checkpoint_storage(sorted(glob.glob(str(tmp_path / "fp" / "*.safetensors"))), layers)


# ---------------------------------------------------------------------------------------------
# The uniform grid and GPTQ onto it
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [False, True])
def test_stored_uniform_tensors_decode_to_the_weights_the_model_runs_with(symmetric):
    w = layer_weight(rows=6, cols=128)
    w[0] = w[0].abs()  # a row without negative weights: 0 must still be a level
    q, storage = peers.gptq(w, 3, hessian(128), symmetric=symmetric, group_size=64)
    codes = unpack_codes(storage.counted["qweight"], 3, q.numel()).reshape(6, 2, 64)
    scales = storage.counted["scales"].double().unsqueeze(-1)
    zeros = (unpack_codes(storage.counted["qzeros"], 3, 12).reshape(6, 2, 1) if not symmetric
             else torch.full((6, 2, 1), 4))
    assert torch.equal((scales * (codes - zeros)).reshape(6, 128), q)
    scale, zero = peers.uniform_grid(w.double(), 3, symmetric)
    assert (peers.grid_levels(scale, zero, 3) == 0).any(dim=1).all()


def naive_gptq(w, h, bits, group_size):
    """GPTQ's reference sweep, column by column, each group's grid fitted on the compensated weights
    when the sweep reaches it."""
    w = w.clone()
    upper = torch.linalg.cholesky(inverse_hessian(h), upper=True)
    for i in range(w.shape[1]):
        if i % group_size == 0:
            table = peers.grid_levels(*peers.uniform_grid(w[:, i:i + group_size], bits, False), bits)
        q = nearest_level(w[:, i:i + 1], table)
        w[:, i:] -= (w[:, i:i + 1] - q) / upper[i, i] * upper[i, i:].unsqueeze(0)
        w[:, i:i + 1] = q
    return w


@pytest.mark.parametrize("bits, group_size", [(2, 32), (3, 64)])
def test_group_gptq_equals_the_column_by_column_sweep_and_beats_rtn(bits, group_size):
    w, h = layer_weight(rows=8, cols=128).double(), hessian(128)
    q, _ = peers.gptq(w, bits, h, group_size=group_size)
    assert torch.allclose(q, naive_gptq(w, prepare_hessian(h), bits, group_size), atol=1e-12)
    rounded, _ = peers.rtn(w, bits, group_size=group_size)
    assert layer_error(w, q, h) < layer_error(w, rounded, h)


def test_per_channel_gptq_beats_rtn_and_rejects_ragged_groups():
    w, h = layer_weight(rows=8, cols=96).double(), hessian(96)
    q, storage = peers.gptq(w, 3, h)
    assert storage.counted["scales"].shape == (8, 1)
    assert layer_error(w, q, h) < layer_error(w, peers.rtn(w, 3)[0], h)
    with pytest.raises(ValueError, match="not a multiple of group_size=64"):
        peers.gptq(w, 3, h, group_size=64)


# ---------------------------------------------------------------------------------------------
# Whole models and size classes
# ---------------------------------------------------------------------------------------------
def tiny_bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64)).eval()


def test_quantize_linears_is_sequential_and_in_place():
    model, names = tiny_bert(), ["encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense"]
    ids = torch.randint(0, 64, (3, 2, 7))
    batches = [{"input_ids": i, "attention_mask": torch.tensor([[1] * 7, [1] * 4 + [0] * 3])} for i in ids]
    before = {n: dict(model.named_modules())[n].weight.detach().clone() for n in names}
    with pytest.raises(ValueError, match="needs calibration batches"):
        peers.quantize_linears(model, names, "gptq_g64", 2)
    stored = peers.quantize_linears(model, names[::-1], "gptq", 2, batches)  # given out of order
    assert list(stored) == names  # quantized in forward order
    for n in names:
        weight = dict(model.named_modules())[n].weight.detach()
        assert not torch.equal(weight, before[n])
        assert weight.unique().numel() <= 4 * weight.shape[0]  # 4 levels per row
    state = peers.state_with_storage(model, stored)
    assert f"{names[0]}.weight" not in state and f"{names[0]}.qweight" in state and f"{names[0]}.bias" in state


def test_collect_hessian_of_a_plain_linear_layer_counts_real_tokens_only():
    """adq_hf.ptq.collect_hessian also serves the peers' plain (not quantized) Linear layers."""
    model = tiny_bert()
    layer = model.encoder.layer[1].intermediate.dense
    batch = {"input_ids": torch.randint(0, 64, (2, 6)), "attention_mask": torch.tensor([[1] * 6, [1] * 2 + [0] * 4])}
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    x = seen[0][batch["attention_mask"].bool()].double()  # 8 real tokens
    assert torch.allclose(collect_hessian(model, layer, [batch]), 2 * x.T @ x / 8)


def test_size_classes_and_the_best_row_of_each():
    assert [size_class(b) for b in (2.0, 2.25, 2.2501, 3.25, 3.7, 4.25, 4.5)] == [
        "<= 2.25", "<= 2.25", "2.25-3.25", "2.25-3.25", "3.25-4.25", "3.25-4.25", "> 4.25"]
    rows = {"fp": {"kind": "fp", "bits_per_weight": 32.0, "cosine": 1.0},
            "a": {"kind": "load", "bits_per_weight": 3.5, "cosine": 0.9},
            "b": {"kind": "peer", "bits_per_weight": 3.3, "cosine": 0.95},
            "c": {"kind": "peer", "bits_per_weight": 2.1, "cosine": 0.5}}
    assert by_size_class(rows) == [("<= 2.25", ["c"], "c"), ("3.25-4.25", ["b", "a"], "b")]
    assert size_frontier(rows) == {"b", "c"}  # a: b is smaller and closer to FP
    rows["d"] = {"kind": "peer", "bits_per_weight": 3.0, "cosine": 0.7}
    assert size_frontier(rows) == {"b", "c", "d"}
    rows["e"] = {"kind": "qat", "cosine": 0.99}  # stored by a run from before bits per weight were recorded
    assert unsized_rows(rows) == ["e"] and size_frontier(rows) == {"b", "c", "d"}
    assert [names for _, names, _ in by_size_class(rows)] == [["c"], ["d"], ["b", "a"]]
