"""resnet20_cifar beyond the basics in test_data_and_models.py: timm conventions, structure,
initialisation, re-import and a safetensors round trip."""

import math
from pathlib import Path
import warnings

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import adq_hf.models


def test_registered_with_timm_and_reimport_is_silent():
    assert "resnet20_cifar" in timm.list_models("resnet20*")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # timm warns "Overwriting ... in registry" on a duplicate name
        source = Path(adq_hf.models.__file__).read_text()  # re-run the module without replacing its classes
        exec(compile(source, adq_hf.models.__file__, "exec"), {"__name__": "adq_hf.models"})
    assert timm.create_model("resnet20_cifar")(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_pretrained_cfg_and_data_config():
    model = timm.create_model("resnet20_cifar", num_classes=100)
    assert model.pretrained_cfg is model.default_cfg and model.pretrained_cfg["input_size"] == (3, 32, 32)
    resolved = timm.data.resolve_data_config({}, model=model)
    assert resolved["mean"] == (0.4914, 0.4822, 0.4465) and resolved["std"] == (0.2470, 0.2435, 0.2616)
    assert model.num_classes == 100 and model.get_classifier().out_features == 100


def test_structure_is_resnet20_option_b():
    model = timm.create_model("resnet20_cifar", in_chans=1)
    assert model.conv1.in_channels == 1 and model.conv1.kernel_size == (3, 3) and model.conv1.out_channels == 16
    convs3x3 = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs3x3) == 19  # stem + 3 stages x 3 blocks x 2; + the classifier = 20 layers
    for stage, width in ((model.layer1, 16), (model.layer2, 32), (model.layer3, 64)):
        assert len(stage) == 3 and stage[-1].conv2.out_channels == width
    projections = [n for n, m in model.named_modules() if n.endswith("downsample")]
    assert projections == ["layer2.0.downsample", "layer3.0.downsample"]
    assert model.layer2[0].downsample[0].kernel_size == (1, 1) and model.layer2[0].downsample[0].stride == (2, 2)
    assert model.forward_features(torch.randn(2, 1, 28, 28)).shape == (2, 64, 7, 7)


def test_kaiming_init():
    torch.manual_seed(0)
    conv = timm.create_model("resnet20_cifar").layer3[1].conv1  # 64 -> 64, 3x3: fan_out = 576
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 576), rel=0.05)


def test_head_options():
    model = timm.create_model("resnet20_cifar", drop_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.train()
    assert not torch.equal(model.forward_head(model.forward_features(x)), model.forward_head(model.forward_features(x)))
    model.eval()
    assert torch.equal(model(x), model(x))
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity) and model(x).shape == (4, 64)
    model.reset_classifier(3, global_pool="")
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (4, 64, 8, 8)


def test_safetensors_round_trip(tmp_path):
    model = timm.create_model("resnet20_cifar", num_classes=10, in_chans=1).eval()
    model.train()(torch.randn(8, 1, 28, 28))  # non-default BatchNorm running statistics
    model.eval()
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    copy = timm.create_model("resnet20_cifar", num_classes=10, in_chans=1)
    copy.load_state_dict(load_file(tmp_path / "m.safetensors"), strict=True)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(copy.eval()(x), model(x))
