"""SmallCNN: a ~0.24 M-parameter CNN for 28x28 (or 32x32) images, the zoo's workhorse.

conv(32) -> pool -> conv(64) -> pool -> conv(128) -> pool -> fc(128) -> fc(classes),
each conv followed by BN and ReLU. The first conv and the last linear stay FP by default.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import ModelConfig, RqlabModel


class SmallCNN(RqlabModel):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        c, h, w = config.input_shape
        self.conv1 = self.conv(c, 32, 3, padding=1, edge=True)
        self.bn1 = self.bn(32)
        self.conv2 = self.conv(32, 64, 3, padding=1)
        self.bn2 = self.bn(64)
        self.conv3 = self.conv(64, 128, 3, padding=1)
        self.bn3 = self.bn(128)
        self.fc1 = self.linear(128 * (h // 8) * (w // 8), 128)
        self.fc2 = self.linear(128, config.num_classes, edge=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)                               # (B, C, H, W)
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)  # (B, 32, H/2, W/2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)  # (B, 64, H/4, W/4)
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)  # (B, 128, H/8, W/8)
        x = F.relu(self.fc1(torch.flatten(x, 1)))           # (B, 128)
        return self.fc2(x)                                  # (B, classes)
