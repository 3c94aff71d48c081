"""PreActResNet-18 (He et al. 2016; the Double-Win Quant CIFAR model) and
WideResNet-34-10 (Zagoruyko & Komodakis 2016; the usual adversarial-training model),
for 32x32 inputs, built from rqlab's quantized layers.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import ModelConfig, RqlabModel


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3, with a 1x1 conv shortcut when the shape changes."""

    def __init__(self, net: RqlabModel, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = net.bn(c_in)
        self.conv1 = net.conv(c_in, c_out, 3, stride, 1)
        self.bn2 = net.bn(c_out)
        self.conv2 = net.conv(c_out, c_out, 3, 1, 1)
        self.shortcut = net.conv(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet18(RqlabModel):
    """PreActResNet-18: ~11.2 M parameters, ~0.557 GMAC at 32x32."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        c = config.input_shape[0]
        self.conv1 = self.conv(c, 64, 3, 1, 1, edge=True)
        blocks, c_in = [], 64
        for c_out, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            for s in (stride, 1):
                blocks.append(PreActBlock(self, c_in, c_out, s))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn_out = self.bn(512)
        self.fc = self.linear(512, config.num_classes, edge=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.conv1(self.normalize(x)))       # (B, 512, H/8, W/8)
        x = F.adaptive_avg_pool2d(F.relu(self.bn_out(x)), 1)     # (B, 512, 1, 1)
        return self.fc(torch.flatten(x, 1))                  # (B, classes)


class WideResNet34_10(RqlabModel):
    """WideResNet-34-10: 5 pre-activation blocks per stage, widths 160/320/640, ~46 M parameters."""

    depth, widen = 34, 10

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        n = (self.depth - 4) // 6
        widths = [16, 16 * self.widen, 32 * self.widen, 64 * self.widen]
        self.conv1 = self.conv(config.input_shape[0], widths[0], 3, 1, 1, edge=True)
        blocks, c_in = [], widths[0]
        for c_out, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                blocks.append(PreActBlock(self, c_in, c_out, stride if i == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn_out = self.bn(widths[-1])
        self.fc = self.linear(widths[-1], config.num_classes, edge=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.conv1(self.normalize(x)))       # (B, 640, H/4, W/4)
        x = F.adaptive_avg_pool2d(F.relu(self.bn_out(x)), 1)
        return self.fc(torch.flatten(x, 1))
