"""ADQ codebook options: the vectorised initialisation (sorted rows) and its equality with the
reference it replaced; group-wise tables (per-group scales of a shared codebook, or a codebook per
group): layout, error, bytes, EMA."""

import pytest
import torch

from adq_hf import ADQConfig
from adq_hf.quantizers import CodebookWeightQuantizer, make_weight_quantizer
from adq_hf.quantizers.base import weight_groups
from adq_hf.quantizers.codebook import (SortedRows, fit_scaled_codebook, initial_codebook, move_levels,
                                        nearest_codes)

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_raw_codebook(rows: torch.Tensor, bits: int) -> torch.Tensor:
    """The quantile initialisation as documented, one row and one side at a time with torch.quantile
    (the loop adq_hf ran before the vectorised version)."""
    books = []
    k_total = 2**bits - 1
    for row in rows:
        neg, pos = -row[row < 0], row[row > 0]
        small = k_total // 2
        pos_k = k_total - small if pos.sum() >= neg.sum() else small
        sides = []
        for mags, k, other in ((neg, k_total - pos_k, pos), (pos, pos_k, neg)):
            mags = mags if mags.numel() else other
            if mags.numel() == 0:
                sides.append(torch.arange(1, k + 1, dtype=row.dtype) * 1e-8)
                continue
            probs = (torch.arange(k, dtype=row.dtype) + 0.5) / k
            sides.append(torch.quantile(mags, probs))
        books.append(torch.cat([-sides[0].flip(0), row.new_zeros(1), sides[1]]))
    return torch.stack(books)


def _rows_of_every_kind():
    torch.manual_seed(0)
    heavy = torch.distributions.StudentT(3.0).sample((24, 200))
    sparse = torch.randn(8, 120) * (torch.rand(8, 120) < 0.3)
    one_sided = torch.rand(4, 60)
    with_zero_rows = torch.cat([torch.zeros(2, 60), torch.randn(2, 60)])
    return {"gaussian": torch.randn(32, 300), "heavy": heavy, "sparse": sparse, "one_sided": one_sided,
            "zero_rows": with_zero_rows, "short": torch.randn(5, 3)}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_vectorised_quantiles_equal_the_per_row_reference(bits):
    for name, rows in _rows_of_every_kind().items():
        expected = _reference_raw_codebook(rows, bits)
        got = initial_codebook(rows, bits)
        scale = rows.abs().max().clamp(min=1)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6 * scale), name
        assert ((got == 0).sum(dim=1) == 1).all(), name


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("init", ["quantile", "uniform"])
def test_sorted_lloyd_iterations_equal_the_scatter_update(bits, init):
    # the sorted-row iterations are move_levels(decay 0) computed from running sums: same levels
    for name, rows in _rows_of_every_kind().items():
        book = initial_codebook(rows, bits, init=init)
        for _ in range(12):
            book = move_levels(book, rows, 0.0)
        got = SortedRows(rows).lloyd(initial_codebook(rows, bits, init=init), 12)
        assert torch.allclose(got, book, rtol=1e-5, atol=1e-6), (name, (got - book).abs().max())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_refinement_keeps_the_lower_error_of_the_quantile_and_uniform_seeds(bits):
    # from quantile seeds Lloyd converges slowly with many levels: at 8 bits 30 steps left a Gaussian
    # tensor at 1.8x the error of a best-step uniform grid (relative error 0.0159 against 0.0088)
    torch.manual_seed(4)
    rows = torch.randn(1, 256 * 9 * 64)
    data = SortedRows(rows, squares=True)
    refined = initial_codebook(rows, bits, iters=30)
    from_quantiles = data.lloyd(initial_codebook(rows, bits), 30)
    from_uniform = data.lloyd(initial_codebook(rows, bits, init="uniform"), 30)
    assert float(data.error(refined)) == min(float(data.error(from_quantiles)), float(data.error(from_uniform)))
    assert float(data.error(refined)) <= float(data.error(from_quantiles))
    relative = (float(data.error(refined)) / float(rows.double().pow(2).sum())) ** 0.5
    assert relative < {2: 0.37, 4: 0.1, 8: 0.0095}[bits], relative


def test_iterations_stop_at_the_fixed_point():
    torch.manual_seed(1)
    rows = torch.randn(6, 40)
    converged = initial_codebook(rows, 2, iters=10_000)
    assert torch.equal(SortedRows(rows).lloyd_step(converged), converged)
    assert torch.allclose(move_levels(converged, rows, 0.0), converged, atol=1e-6)  # float32 sums there


def test_sorted_rows_error_equals_the_rounding_error():
    torch.manual_seed(2)
    rows = torch.randn(7, 90)
    importance = torch.rand(7, 90)
    book = initial_codebook(rows, 3, iters=5)
    rounded = book.gather(1, nearest_codes(rows, book)).double()
    rows, importance = rows.double(), importance.double()
    plain = SortedRows(rows, squares=True).error(book)
    weighted = SortedRows(rows, importance, squares=True).error(book)
    assert torch.allclose(plain, ((rounded - rows) ** 2).sum(dim=1), rtol=1e-9, atol=1e-9)
    assert torch.allclose(weighted, (importance * (rounded - rows) ** 2).sum(dim=1), rtol=1e-9, atol=1e-9)


def test_rows_are_initialised_in_chunks_with_the_same_result(monkeypatch):
    from adq_hf.quantizers import codebook

    torch.manual_seed(3)
    rows = torch.randn(10, 50)
    whole = initial_codebook(rows, 3, iters=30)
    monkeypatch.setattr(codebook, "INIT_CHUNK_ELEMENTS", 120)  # 2 rows per chunk
    assert torch.equal(initial_codebook(rows, 3, iters=30), whole)


def test_quantizer_init_from_a_conv_weight_per_channel():
    torch.manual_seed(4)
    weight = torch.randn(8, 4, 3, 3)
    q = CodebookWeightQuantizer(2, num_groups=8)
    q.init_from(weight)
    assert torch.equal(q.codebook, initial_codebook(weight.reshape(8, -1), 2, iters=30))


# ---------------------------------------------------------------- group-wise tables

def _minilm_linear_weights(count=3):
    import os

    from safetensors.torch import load_file

    from adq_hf.data import minilm_path

    state = load_file(os.path.join(minilm_path(), "model.safetensors"))
    names = [k for k, v in state.items() if k.endswith(".weight") and v.dim() == 2 and "embeddings" not in k]
    return [state[n] for n in names[:count]] + [state[names[5]]]  # q, k, v and a 384 x 1536 output layer


def _relative_error(q, weight):
    return float(((q(weight) - weight).double() ** 2).sum() / (weight.double() ** 2).sum())


def test_group_options_are_validated_with_clear_errors():
    with pytest.raises(ValueError, match="group_size"):
        ADQConfig(granularity="per_group", group_size=1)
    with pytest.raises(ValueError, match="group_size"):
        ADQConfig(granularity="per_group", group_size=True)
    with pytest.raises(ValueError, match="group_tables"):
        ADQConfig(granularity="per_group", group_tables="shared")
    with pytest.raises(ValueError, match="per_group.*post"):
        ADQConfig(weight_quantizer="post", granularity="per_group")
    config = ADQConfig(granularity="per_group", group_size=64)
    assert ADQConfig.from_dict(config.to_dict()) == config


def test_groups_are_contiguous_slices_and_conv_columns_fall_back_to_channels():
    config = ADQConfig(weight_bits=3, granularity="per_group", group_size=64)
    assert weight_groups(config, (96, 384)) == 96 * 6
    assert weight_groups(config, (8, 64, 3, 3)) == 8 * 9  # columns in * kh * kw = 576
    with pytest.warns(UserWarning, match="144 columns, not a multiple of group_size=64"):
        assert weight_groups(config, (32, 16, 3, 3)) == 32
    q = make_weight_quantizer(config, 3, (8, 64, 3, 3))
    torch.manual_seed(0)
    weight = torch.randn(8, 64, 3, 3)
    q.init_from(weight)
    table = q.levels()
    assert table.shape == (72, 8) and q.scale.dtype == torch.float16 and q.codebook.shape == (1, 8)
    assert ((table == 0).sum(dim=1) == 1).all() and (table.diff(dim=1) > 0).all()
    # group g holds the g-th run of 64 weights of the row-major flattened weight, decoded by its own table
    codes = q.encode(weight)
    flat = weight.reshape(-1)
    for g in (0, 5, 71):
        assert torch.equal(q.decode(codes).reshape(-1)[64 * g:64 * (g + 1)],
                           table[g][codes.reshape(-1)[64 * g:64 * (g + 1)]])
        distances = (flat[64 * g:64 * (g + 1), None] - table[g][None, :]).abs()  # the nearest of its own levels
        assert torch.allclose(distances.gather(1, codes.reshape(-1)[64 * g:64 * (g + 1), None]).squeeze(1),
                              distances.min(dim=1).values, atol=1e-6)
    assert torch.equal(q(weight), q.decode(codes))
    uniform = make_weight_quantizer(ADQConfig(granularity="per_group", group_size=64, codebook_init="uniform"), 3,
                                    weight.shape)
    uniform.init_from(weight)  # the ablation's best-step grid as the shared codebook's start
    assert ((uniform.codebook == 0).sum() == 1) and (uniform.codebook.diff(dim=1) > 0).all()
    lsq = make_weight_quantizer(ADQConfig(weight_quantizer="lsq", granularity="per_group", group_size=64), 3, (8, 576))
    assert lsq.step.shape == (72, 1) and lsq.levels().shape == (72, 8)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_group_scales_beat_per_channel_codebooks_on_error_and_bytes(bits):
    # real MiniLM weights: a per-channel fp32 codebook costs 2**b * 32 / 384 bits per weight there
    config = {name: ADQConfig(weight_bits=bits, **fields) for name, fields in {
        "channel": {"granularity": "per_channel"},
        "g64": {"granularity": "per_group", "group_size": 64},
        "g128_codebooks": {"granularity": "per_group", "group_size": 128, "group_tables": "codebooks"}}.items()}
    errors, table_bytes = {n: 0.0 for n in config}, {n: 0 for n in config}
    for weight in _minilm_linear_weights():
        for name, c in config.items():
            q = make_weight_quantizer(c, bits, weight.shape)
            q.init_from(weight)
            errors[name] += _relative_error(q, weight)
            table_bytes[name] += q.table_bytes()
    assert errors["g64"] < errors["channel"]
    assert max(table_bytes["g64"], table_bytes["channel"]) < table_bytes["g128_codebooks"]
    if bits >= 3:  # 2**b fp32 levels per 384-column row cost more than an fp16 scale per 64 columns
        assert table_bytes["g64"] < table_bytes["channel"]


def test_scale_rounds_lower_the_weighted_error():
    torch.manual_seed(5)
    rows = torch.distributions.StudentT(3.0).sample((64, 64))
    importance = torch.rand(64, 64)

    def weighted_error(book, scale):
        table = book * scale.float()
        q = table.gather(1, nearest_codes(rows, table))
        return float((importance * (q - rows) ** 2).sum())

    errors = [weighted_error(*fit_scaled_codebook(rows, 3, iters=100, importance=importance, rounds=r))
              for r in (0, 1, 3)]
    assert errors[1] < errors[0] and errors[2] <= errors[1] * 1.001


def test_group_scales_ema_moves_the_shared_codebook_to_weighted_means():
    q = CodebookWeightQuantizer(2, num_groups=2, ema_decay=0.5, group_scales=True)
    q.codebook.copy_(torch.tensor([[-1.0, 0.0, 0.5, 1.0]]))
    q.scale.copy_(torch.tensor([[1.0], [2.0]], dtype=torch.float16))
    weight = torch.tensor([[-0.8, 0.1, 0.6, 0.9], [-2.0, 0.0, 1.2, 1.6]])
    # normalised: [-0.8, 0.1, 0.6, 0.9] and [-1.0, 0.0, 0.6, 0.8], weights s**2 = 1 and 4
    q.ema_update(weight)
    expected_low = 0.5 * -1.0 + 0.5 * (1 * -0.8 + 4 * -1.0) / 5
    expected_mid = 0.5 * 0.5 + 0.5 * (1 * 0.6 + 4 * 0.6) / 5
    expected_top = 0.5 * 1.0 + 0.5 * (1 * 0.9 + 4 * 0.8) / 5
    assert q.codebook[0].tolist() == pytest.approx([expected_low, 0.0, expected_mid, expected_top], abs=1e-6)


def test_memory_report_and_allocation_count_the_group_scales():
    import adq_hf
    from adq_hf.deploy import memory_report
    from adq_hf.mixed_precision import layer_bytes

    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(256, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    config = ADQConfig(weight_bits=3, granularity="per_group", group_size=64, last_layer_bits=3)
    adq_hf.quantize_model(model, config)
    report = memory_report(model)
    # codes + an fp32 codebook of 8 levels + one fp16 scale per group of 64 (the 32-column layer: per channel)
    expected = (256 * 32 * 3 / 8 + 8 * 4 + 32 * 4 * 2) + (32 * 8 * 3 / 8 + 8 * 4 + 8 * 2)
    assert report["information_limit_bytes"] == round(expected)
    assert report["bits_per_weight"] == pytest.approx(8 * expected / (256 * 32 + 32 * 8))
    assert layer_bytes(model[0].latent_weight(), 3, config) == 256 * 32 * 3 // 8 + 8 * 4 + 128 * 2


# ---------------------------------------------------------------- group-wise tables end to end

GROUP_CONFIGS = {
    "scaled": ADQConfig(weight_bits=3, granularity="per_group", group_size=16),
    "codebooks": ADQConfig(weight_bits=2, granularity="per_group", group_size=16, group_tables="codebooks"),
    "lsq": ADQConfig(weight_bits=3, weight_quantizer="lsq", granularity="per_group", group_size=16),
}


@pytest.mark.parametrize("name", sorted(GROUP_CONFIGS))
def test_grouped_resnet_packs_reloads_deploys_and_exports_exactly(name, tmp_path):
    import timm

    import adq_hf
    from adq_hf.deploy import convert_for_inference, export_onnx, memory_report

    torch.manual_seed(0)
    # ResNet-20's convs have 144, 288 and 576 columns: groups of 16 everywhere (the 1-channel stem's 9
    # columns fall back to one group per channel)
    with pytest.warns(UserWarning, match="9 columns"):
        model = timm.create_model("resnet20_cifar", num_classes=10, in_chans=1, quantization_config=GROUP_CONFIGS[name])
    layer = model.layer2[0].conv1
    assert layer.weight_quantizer.levels().shape == (32 * 144 // 16, 2**layer.weight_bits)
    x = torch.randn(4, 1, 28, 28)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    model(x).logsumexp(-1).mean().backward()  # a training step: the EMA moves the (shared) codebooks
    opt.step()
    model.eval()
    with torch.no_grad():
        expected = model(x)
    adq_hf.save_pretrained(model, str(tmp_path / "ckpt"))
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'ckpt'}").eval()
    deployed = timm.create_model(f"local-dir:{tmp_path / 'ckpt'}", deploy=True)
    adq_hf.deploy.set_exact(deployed)  # bit for bit (the fused kernels reassociate sums: docs/deploy.md)
    with torch.no_grad():
        assert torch.equal(reloaded(x), expected)
        assert torch.equal(deployed(x), expected)
    if name == "scaled":  # the scales are stored in float16 and counted at 2 bytes
        from safetensors import safe_open

        with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="pt") as f:
            assert f.get_tensor("layer2.0.conv1.weight_quantizer.scale").dtype == torch.float16
    report = memory_report(convert_for_inference(reloaded))
    assert report["quantized_weight_bytes"] <= 1.01 * report["information_limit_bytes"]
    result = export_onnx(deployed, x[:1], str(tmp_path / "model.onnx"))
    assert result["rel_l2"] < 1e-5


def test_grouped_bert_from_pretrained_saves_reloads_deploys_and_exports(tmp_path):
    from transformers import AutoModel, BertConfig, BertModel

    import adq_hf
    from adq_hf.deploy import export_onnx

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=100)
    BertModel(cfg).save_pretrained(tmp_path / "fp")
    config = ADQConfig(weight_bits=3, granularity="per_group", group_size=32)
    model = AutoModel.from_pretrained(tmp_path / "fp", quantization_config=config).eval()
    query = model.encoder.layer[0].attention.self.query
    assert query.weight_quantizer.scale.shape == (64 * 2, 1)
    batch = {"input_ids": torch.randint(0, 100, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModel.from_pretrained(tmp_path / "q").eval()
    assert reloaded.config.quantization_config == config
    assert reloaded.encoder.layer[0].attention.self.query.weight_quantizer.scale.dtype == torch.float16
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).last_hidden_state, expected)
    adq_hf.convert_for_inference(reloaded)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).last_hidden_state, expected)
    assert export_onnx(reloaded, batch, str(tmp_path / "bert.onnx"))["rel_l2"] < 1e-5


# ---------------------------------------------------------------- sensitivity-weighted codebooks

@pytest.fixture(scope="module")
def minilm_and_batches():
    from transformers import AutoTokenizer

    from adq_hf.data import english_sentences, minilm_path

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    sentences = english_sentences(24)
    batches = [dict(tokenizer(sentences[i:i + 12], padding=True, return_tensors="pt")) for i in (0, 12)]
    return path, batches


def test_weighting_options_are_validated_and_need_data(minilm_and_batches):
    from transformers import AutoModel

    import adq_hf

    with pytest.raises(ValueError, match="codebook_weighting"):
        ADQConfig(codebook_weighting="gradient")
    with pytest.raises(ValueError, match="codebook_weighting.*'lsq'"):
        ADQConfig(weight_quantizer="lsq", codebook_weighting="hessian")
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    with pytest.raises(ValueError, match="calibration data.*fit_codebooks"):
        adq_hf.quantize_model(model, ADQConfig(codebook_weighting="hessian", last_layer_bits=4))
    path, _ = minilm_and_batches
    with pytest.raises(ValueError, match="fit_codebooks"):
        AutoModel.from_pretrained(path, quantization_config=ADQConfig(weight_bits=3, codebook_weighting="fisher"))


def test_hessian_importance_is_the_diagonal_of_the_ptq_hessian(minilm_and_batches):
    from transformers import AutoModel

    from adq_hf.importance import weight_importance
    from adq_hf.ptq import collect_hessian

    path, batches = minilm_and_batches
    model = AutoModel.from_pretrained(path, quantization_config=ADQConfig(weight_bits=4)).eval()
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.3.output.dense"]
    importance = weight_importance(model, batches, "hessian", names)
    for name in names:
        layer = model.get_submodule(name)
        diagonal = collect_hessian(model, layer, batches).diagonal() / 2  # H = 2/N X X^T
        assert importance[name].shape == layer.latent_weight().shape
        assert torch.allclose(importance[name][0].double(), diagonal, rtol=1e-4)
        assert torch.equal(importance[name][0], importance[name][-1])  # one value per input column


def test_fisher_importance_is_the_mean_squared_gradient_with_labels():
    from adq_hf.importance import weight_importance

    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    batches = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(2)]
    importance = weight_importance(model, batches, "fisher")
    expected = torch.zeros(5, 6, dtype=torch.float64)
    for x, y in batches:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        expected += model[0].weight.grad.double() ** 2
    assert torch.allclose(importance["0"].double(), expected / 2, rtol=1e-5)


@pytest.mark.parametrize("granularity", ["per_channel", "per_group"])
@pytest.mark.parametrize("method", ["hessian", "fisher"])
def test_weighted_codebooks_lower_the_weighted_error_on_real_layers(minilm_and_batches, granularity, method):
    from transformers import AutoModel

    from adq_hf.importance import weight_importance

    path, batches = minilm_and_batches
    fp = AutoModel.from_pretrained(path).eval()
    names = ["encoder.layer.0.attention.self.value", "encoder.layer.4.intermediate.dense"]
    importance = weight_importance(fp, batches, method, names)
    config = ADQConfig(weight_bits=3, granularity=granularity, group_size=128)
    for name in names:
        weight = fp.get_submodule(name).weight.detach()
        plain, weighted = (make_weight_quantizer(config, 3, weight.shape) for _ in range(2))
        plain.init_from(weight)
        weighted.init_from(weight, importance=importance[name])
        errors = [float((importance[name].double() * (q(weight) - weight).double() ** 2).sum()) for q in (plain, weighted)]
        assert errors[1] < errors[0], (name, errors)


def test_quantize_model_and_fit_codebooks_weight_the_fit_and_reload_exactly(minilm_and_batches, tmp_path):
    from transformers import AutoModel

    import adq_hf

    path, batches = minilm_and_batches
    config = ADQConfig(weight_bits=3, granularity="per_group", group_size=128, codebook_weighting="hessian")
    model = adq_hf.quantize_model(AutoModel.from_pretrained(path).eval(), config, calibration_data=batches)
    plain = AutoModel.from_pretrained(path, quantization_config=ADQConfig(weight_bits=3, granularity="per_group",
                                                                         group_size=128)).eval()
    query = "encoder.layer.1.attention.self.query"
    assert not torch.equal(model.get_submodule(query).weight_quantizer.scale,
                           plain.get_submodule(query).weight_quantizer.scale)
    adq_hf.fit_codebooks(plain, batches, "hessian")  # after loading: the same fit where the inputs are the same
    assert plain.config.quantization_config.codebook_weighting == "hessian"
    for name in ("query", "key", "value"):  # their input, the embeddings, is not quantized in either model
        ours = model.get_submodule(f"encoder.layer.0.attention.self.{name}").weight_quantizer
        other = plain.get_submodule(f"encoder.layer.0.attention.self.{name}").weight_quantizer
        assert torch.equal(ours.codebook, other.codebook) and torch.equal(ours.scale, other.scale), name
    with torch.no_grad():
        expected = plain(**batches[0]).last_hidden_state
    plain.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()  # pre-quantized: no data needed to load it
    assert reloaded.config.quantization_config.codebook_weighting == "hessian"
    with torch.no_grad():
        assert torch.equal(reloaded(**batches[0]).last_hidden_state, expected)


# ---------------------------------------------------------------- PTQ onto group-wise tables

def _grouped_layer_and_hessian(bits=3, tables="scaled", seed=8, group_size=32):
    from adq_hf.nn import convert_layer

    torch.manual_seed(seed)
    layer = torch.nn.Linear(96, 12)
    x = torch.randn(400, 96) @ torch.randn(96, 96) / 10  # correlated inputs: compensation matters
    config = ADQConfig(weight_bits=bits, granularity="per_group", group_size=group_size, group_tables=tables)
    quantizer = make_weight_quantizer(config, bits, layer.weight.shape)
    quantizer.init_from(layer.weight.detach())
    convert_layer(layer, quantizer)
    return layer.eval(), (2 / x.shape[0]) * (x.T @ x).double()  # eval: no EMA step when we look at it


def test_level_grid_rounds_each_column_to_its_own_groups_table():
    from adq_hf.ptq import LevelGrid, row_tables

    layer, _ = _grouped_layer_and_hessian()
    w = layer.latent_weight().detach().double()
    grid = row_tables(layer.weight_quantizer.levels(), *w.shape)
    assert isinstance(grid, LevelGrid) and grid.tables.shape == (12, 3, 8) and grid.size == 32
    q = grid.nearest(w)
    assert torch.equal(q.float(), layer.weight_quantizer(layer.latent_weight()).detach())
    cols = torch.tensor([70, 3, 40])  # a permuted subset of columns: each still uses its own group
    assert torch.equal(grid.nearest(w[:, cols], cols), q[:, cols])
    with pytest.raises(ValueError, match="groups of contiguous columns"):
        row_tables(torch.zeros(36, 8), 12, 100)


@pytest.mark.parametrize("tables", ["scaled", "codebooks"])
@pytest.mark.parametrize("method", ["gptq", "sa", "obq"])
def test_ptq_onto_group_tables_beats_rtn_and_stays_on_the_tables(method, tables):
    from adq_hf.ptq import quantize_layer

    # blocks of 16 columns and groups of 16: groups first opened in a later block (SA: of fewer columns)
    for refit, block_size, group_size, bits in ((False, 128, 32, 3), (True, 128, 32, 3), (True, 16, 16, 2)):
        if method == "obq" and refit:
            continue  # OBQ works row by row with a fixed grid
        layer, h = _grouped_layer_and_hessian(bits, tables=tables, group_size=group_size)
        result = quantize_layer(layer, h, method, refit=refit, block_size=block_size)
        assert result["error"] < result["rtn_error"], (refit, result)
        quantizer = layer.weight_quantizer
        weight = layer.latent_weight().detach()
        assert torch.equal(quantizer(weight).detach(), weight)  # exactly on the (re-fitted) tables
        assert torch.equal(quantizer.decode(quantizer.encode(weight)), weight)


def test_refit_re_fits_group_scales_from_the_compensated_weights():
    from adq_hf.ptq import quantize_layer

    fixed, h = _grouped_layer_and_hessian(bits=2)
    refitted, _ = _grouped_layer_and_hessian(bits=2)
    before = refitted.weight_quantizer.scale.clone()
    errors = [quantize_layer(layer, h, "gptq", refit=refit, act_order=False)["error"]
              for layer, refit in ((fixed, False), (refitted, True))]
    assert torch.equal(fixed.weight_quantizer.scale, before)
    assert not torch.equal(refitted.weight_quantizer.scale, before)
    assert torch.equal(refitted.weight_quantizer.codebook, fixed.weight_quantizer.codebook)  # shared: kept
    assert errors[1] < errors[0]


def test_ptq_quantize_with_group_tables_saves_and_reloads_exactly(minilm_and_batches, tmp_path):
    from transformers import AutoModel

    from adq_hf import ptq

    path, batches = minilm_and_batches
    config = ADQConfig(weight_bits=3, granularity="per_group", group_size=128)
    model = AutoModel.from_pretrained(path, quantization_config=config).eval()
    with torch.no_grad():
        before = model(**batches[1]).last_hidden_state
    ptq.quantize(model, batches[:1], None, method="gptq", progress=False)
    assert all(r["error"] <= r["rtn_error"] for r in model.ptq_report.values())
    with torch.no_grad():
        expected = model(**batches[1]).last_hidden_state
    assert not torch.equal(expected, before)
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batches[1]).last_hidden_state, expected)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_group"])
def test_refined_levels_lower_the_layer_error_and_stay_decodable(granularity):
    from adq_hf.nn import convert_layer
    from adq_hf.ptq import layer_error, quantize_layer

    errors = []
    for refine in (False, True):
        torch.manual_seed(9)
        layer = torch.nn.Linear(96, 12)
        x = torch.randn(400, 96) @ torch.randn(96, 96) / 10
        h = (2 / x.shape[0]) * (x.T @ x).double()
        config = ADQConfig(weight_bits=3, granularity=granularity, group_size=32)
        quantizer = make_weight_quantizer(config, 3, layer.weight.shape)
        quantizer.init_from(layer.weight.detach())
        w = layer.weight.detach().double().clone()
        convert_layer(layer, quantizer).eval()
        result = quantize_layer(layer, h, "gptq", refine_levels=refine)
        q = layer.latent_weight().detach()
        assert result["error"] == pytest.approx(layer_error(w, q.double(), h))
        assert torch.equal(quantizer(q), q)  # decodes to itself: the codes index the (re-sorted) levels
        book = quantizer.codebook
        assert ((book == 0).sum(dim=1) == 1).all() and (book.diff(dim=1) > 0).all()
        errors.append(result["error"])
    assert errors[1] < errors[0]
