import json
import random

import pytest
import timm
import torch
from torch import nn

import adq_hf
from adq_hf import ADQConfig, quantize_model
from adq_hf.mixed_precision import (
    allocate_bits,
    estimate_sensitivity,
    exact_layer_traces,
    objective,
    write_report,
)
from adq_hf.mixed_precision.allocation import lut_bytes


def tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))


def test_hutchinson_matches_the_exact_hessian_trace():
    model = tiny_mlp()
    batch = (torch.randn(16, 5), torch.randint(0, 3, (16,)))
    exact, sizes = exact_layer_traces(model, batch)
    estimate = estimate_sensitivity(model, [batch], max_iters=20000, tol=0.0, seed=1, progress=False)
    scale = max(abs(t) for t in exact.values())
    for name in exact:
        # stated tolerance: 5% of the largest layer trace (Rademacher variance over 20,000 probes)
        assert estimate[name] * sizes[name] == pytest.approx(exact[name], abs=0.05 * scale)
    again = estimate_sensitivity(model, [batch], max_iters=200, tol=0.0, seed=1, progress=False)
    assert again == estimate_sensitivity(model, [batch], max_iters=200, tol=0.0, seed=1, progress=False)


def test_fisher_and_transformer_models():
    model = timm.create_model("test_vit", num_classes=4)
    batch = (torch.randn(2, 3, 160, 160), torch.tensor([0, 3]))
    fisher = estimate_sensitivity(model, [batch], method="fisher", progress=False)
    assert set(fisher) == {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert all(v >= 0 for v in fisher.values()) and max(fisher.values()) > 0
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                vocab_size=100))
    hutch = estimate_sensitivity(bert, [{"input_ids": torch.randint(0, 100, (2, 7))}], max_iters=4, progress=False)
    assert len(hutch) == 2 * 6 + 1 and all(v == v for v in hutch.values())


def sized_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32))


def test_allocation_meets_the_budget_and_favours_the_sensitive_layer():
    model = sized_model()
    sens = {"0": 1e3, "1": 1e-3, "2": 1e-3, "3": 1e-3}
    bits = allocate_bits(model, sens, target_avg_bits=3.0, candidates=(2, 3, 4, 8))
    assert set(bits.values()) <= {2, 3, 4, 8}
    assert sum(bits.values()) / 4 <= 3.0
    assert bits["0"] > max(bits["1"], bits["2"], bits["3"])


def test_byte_budget_counts_codes_and_lookup_tables():
    model = sized_model()
    config = ADQConfig()
    sens = {str(i): 1.0 for i in range(4)}
    budget = 4 * 1024 * 3 // 8 + 4 * lut_bytes(model[0].weight, 3, config)
    bits = allocate_bits(model, sens, max_bytes=budget, candidates=(2, 3, 4), config=config)
    used = sum(1024 * b / 8 + lut_bytes(model[int(n)].weight, b, config) for n, b in bits.items())
    assert used <= budget


def test_exact_solver_is_never_worse_than_greedy():
    rng = random.Random(0)
    model = nn.Sequential(*[nn.Linear(rng.choice([8, 16, 24]), 16) for _ in range(6)])
    config = ADQConfig()
    for trial in range(5):
        sens = {str(i): 10 ** rng.uniform(-3, 2) for i in range(6)}
        target = rng.uniform(2.3, 4.5)
        exact = allocate_bits(model, sens, target_avg_bits=target, config=config)
        greedy = allocate_bits(model, sens, target_avg_bits=target, config=config, method="greedy")
        assert objective(model, sens, exact, config) <= objective(model, sens, greedy, config) * (1 + 1e-9)


def test_ties_share_bits():
    model = sized_model()
    sens = {"0": 1e3, "1": 1e-6, "2": 1e-3, "3": 1e-3}
    bits = allocate_bits(model, sens, target_avg_bits=3.0, ties=[("0", "1")])
    assert bits["0"] == bits["1"]


def test_infeasible_budget_and_bad_arguments():
    model = sized_model()
    sens = {"1": 1.0, "2": 1.0}
    with pytest.raises(ValueError, match=r"infeasible .* smallest feasible budget is 3.5000 average bits"):
        allocate_bits(model, sens, target_avg_bits=3.0, fixed={"0": 8, "3": 2}, candidates=(2, 4))
    with pytest.raises(ValueError, match="needs a budget"):
        allocate_bits(model, sens)
    with pytest.raises(ValueError, match="method='ilp'"):
        allocate_bits(model, sens, target_avg_bits=3, method="ilp")
    with pytest.raises(ValueError, match=r"candidates=\[1, 2\]"):
        allocate_bits(model, sens, target_avg_bits=3, candidates=(1, 2))
    with pytest.raises(ValueError, match="not Linear/Conv2d layers"):
        allocate_bits(model, {"nope": 1.0}, target_avg_bits=3)
    with pytest.raises(ValueError, match="method='taylor'"):
        estimate_sensitivity(model, [torch.randn(2, 32)], method="taylor")
    with pytest.raises(ValueError, match="dataloader is empty"):
        estimate_sensitivity(model, [])


def test_target_avg_bits_in_quantize_model_fills_layer_bits_and_report(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet20_cifar", num_classes=10, in_chans=1)
    calibration = [(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)))]
    config = ADQConfig(target_avg_bits=3.0, activation_bits=4)
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize_model(timm.create_model("resnet20_cifar", in_chans=1), ADQConfig(target_avg_bits=3.0))
    quantize_model(model, config, calibration_data=calibration)
    assert len(config.layer_bits) == 20  # every body layer; stem and classifier keep 8 bits
    assert adq_hf.average_weight_bits(model) <= 3.0
    assert adq_hf.bit_map(model)["conv1"]["weight_bits"] == 8
    # the saved config reproduces the bit map without running the analysis again
    replay = ADQConfig.from_dict(json.loads(config.to_json_string()))
    again = quantize_model(timm.create_model("resnet20_cifar", num_classes=10, in_chans=1), replay)
    assert adq_hf.bit_map(again) == adq_hf.bit_map(model)
    paths = write_report(model, None, str(tmp_path))
    table = open(paths["md"]).read()
    assert "layer3.0.conv1" in table and "Average weight bits" in table
    assert json.load(open(paths["json"]))["average_weight_bits"] == pytest.approx(adq_hf.average_weight_bits(model))
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_sensitivity_writes_the_report(tmp_path, capsys):
    from adq_hf.cli import main

    code = main(["sensitivity", "resnet20_cifar", "--in-chans", "1", "--num-classes", "10", "--input-size", "1", "28",
                 "28", "--batch-size", "16", "--num-batches", "1", "--method", "fisher", "--target-avg-bits", "3",
                 "--out", str(tmp_path)])
    assert code == 0
    report = json.load(open(tmp_path / "bit_report.json"))
    assert report["average_weight_bits"] <= 3.0 and len(report["layers"]) == 22
    assert "layer_bits for ADQConfig" in capsys.readouterr().out
    assert main(["sensitivity", "resnet20_cifar", "--dataset", str(tmp_path / "missing")]) == 2
