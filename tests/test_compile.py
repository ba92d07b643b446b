"""The quantizers under torch.compile (the recipe's ``train.compile``): the same loss and gradients
as eager, the codebook still adapts once per optimiser step. The ``aot_eager`` backend traces what
inductor would compile (the fused functions' compile-time branches included) without generating
C++, so the test stays short; benchmarks/step_time.py --compile measures inductor."""

import pytest
import torch
from torch import nn

from adq_hf import ADQConfig, quantize_model
from adq_hf.training import compiled

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "adq": ADQConfig(weight_bits=2, activation_bits=2, first_layer_bits=2, last_layer_bits=2),
    "lsq": ADQConfig(weight_bits=2, activation_bits=2, weight_quantizer="lsq", activation_quantizer="lsq",
                     first_layer_bits=2, last_layer_bits=2),
    "asq_post": ADQConfig(weight_bits=2, activation_bits=2, weight_quantizer="post", activation_quantizer="asq",
                          first_layer_bits=2, last_layer_bits=2),
}


def small_model(config, x):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    # BatchNorm statistics of the data, as a trained model has them: calibration runs in eval mode, and
    # with the initial statistics (mean 0, variance 1) the ranges it sets would clip every training-mode
    # input of the classifier (no gradient would reach the convolutions)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # cumulative average
        model.train()(x)
    quantize_model(model, config, calibration_data=[x])
    return model.train()


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_compiled_steps_match_eager(method):
    torch._dynamo.reset()
    torch.manual_seed(1)
    x, y = torch.randn(16, 1, 12, 12), torch.randint(0, 10, (16,))
    eager, other = small_model(CONFIGS[method], x), small_model(CONFIGS[method], x)
    step_model = compiled(other, "aot_eager")
    assert step_model is not other and compiled(other, False) is other
    optims = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (eager, other)]
    for _ in range(3):
        losses = []
        for model, run, opt in zip((eager, other), (eager, step_model), optims):
            loss = nn.functional.cross_entropy(run(x), y)
            opt.zero_grad()
            loss.backward()
            losses.append(loss.detach())
            grads = [p.grad.clone() for p in model.parameters()]
            opt.step()
            if model is eager:
                eager_grads = grads
        assert torch.allclose(losses[0], losses[1], rtol=1e-5)
        for a, b in zip(eager_grads, grads):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * a.abs().max().item())
    if method == "adq":  # the EMA update runs outside the graph, once per optimiser step, as in eager
        books = [(m[3].weight_quantizer.num_updates.item(), m[3].weight_quantizer.codebook) for m in (eager, other)]
        assert books[0][0] == books[1][0] == 2 and torch.allclose(books[0][1], books[1][1])
