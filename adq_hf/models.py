"""Architectures adq_hf registers with timm: the CIFAR-style ResNet-20 of the ADQ ablations and of
our benchmarks (timm has ImageNet ResNets only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._registry import _model_entrypoints


class BasicBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:  # option B: 1x1 projection
            self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs))

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(x)) + shortcut)


class CifarResNet(nn.Module):
    """3 stages of ``depth`` basic blocks, 16/32/64 channels, 3x3 stem, global average pool."""

    def __init__(self, layers=(3, 3, 3), widths=(16, 32, 64), num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0, global_pool: str = "avg"):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool={global_pool!r}: CifarResNet supports 'avg' or '' (none)")
        self.num_classes, self.in_chans, self.drop_rate, self.global_pool = num_classes, in_chans, drop_rate, global_pool
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, chs = [], widths[0]
        for i, (depth, width) in enumerate(zip(layers, widths)):
            blocks = [BasicBlock(chs if j == 0 else width, width, 2 if (i > 0 and j == 0) else 1) for j in range(depth)]
            stages.append(nn.Sequential(*blocks))
            chs = width
        self.layer1, self.layer2, self.layer3 = stages
        self.num_features = self.head_hidden_size = chs
        self.fc = nn.Linear(chs, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=w, reduction=2**i, module=f"layer{i + 1}") for i, w in enumerate(widths)]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({
    "resnet20_cifar": {
        "url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (8, 8), "crop_pct": 1.0,
        "interpolation": "bilinear", "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616),
        "first_conv": "conv1", "classifier": "fc", "license": "apache-2.0",
    },
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> CifarResNet:
    return build_model_with_cfg(CifarResNet, variant, pretrained, **kwargs)


if "resnet20_cifar" not in _model_entrypoints:  # re-import (e.g. importlib.reload) must not re-register

    @register_model
    def resnet20_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
        """CIFAR-style ResNet-20 (He et al., 2016): 3x3 basic blocks, 0.27M parameters at 10 classes."""
        return _create("resnet20_cifar", pretrained, layers=(3, 3, 3), **kwargs)
