"""Models shared by the examples, benchmarks and tests.

``resnet32`` is the CIFAR ResNet-32 of He et al. (2016) as used by the GradiVeQ paper: a 3x3 stem conv, then
3 stages of 5 basic blocks with 16, 32 and 64 channels, identity shortcuts with zero-padding for the channel
change (option A, so no 1x1 convs), global average pooling and a linear classifier: 31 conv layers and about
0.46M parameters.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["resnet32", "ResNet", "BasicBlock", "SmallCNN", "conv_weight_names"]


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes - in_planes
        self.stride = stride

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks_per_stage: int = 5, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks_per_stage):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def resnet32(num_classes: int = 100, in_channels: int = 3) -> ResNet:
    return ResNet(5, num_classes, in_channels)


class SmallCNN(nn.Module):
    """Three 3x3 convs (16-32-32 channels) and a linear head: the small model of the accuracy runs."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 3 * 3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.adaptive_avg_pool2d(F.relu(self.conv3(x)), 3)
        return self.fc(x.flatten(1))


def conv_weight_names(model: nn.Module) -> list:
    """Names of the conv weights, in registration order: the parameters GradiVeQ compresses by default."""
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.weight.requires_grad:
            names.append(f"{module_name}.weight" if module_name else "weight")
    return names
