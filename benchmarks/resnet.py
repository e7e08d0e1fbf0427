"""A ResNet-18-style network for 32x32 images (He et al. 2016), defined here (no torchvision).

Four stages of two BasicBlocks (3x3 conv - BatchNorm - ReLU - 3x3 conv - BatchNorm, plus the
identity or a 1x1 strided conv + BatchNorm shortcut), widths 64-128-256-512, global average
pooling and a Linear head: 20 convolutions and 1 Linear, 11.2 M parameters.

``stem="imagenet"`` (default) is the ImageNet stem (7x7 stride-2 conv, 3x3 stride-2 max-pool),
as a user who takes the standard ResNet-18 for 32x32 inputs gets: the stages then run at 8, 4,
2 and 1 pixels, so the 3x3 convs of the last stage see one pixel and 8 of their 9 kernel taps
only ever read zero padding (their 4608-wide K-FAC input factor has 4096 zero rows and
columns). ``stem="cifar"`` is the CIFAR variant (one 3x3 stride-1 conv, no pooling; stages at
32, 16, 8, 4 pixels; about 16x the FLOPs).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

STEMS = ("imagenet", "cifar")


class BasicBlock(nn.Module):
    def __init__(self, inp: int, out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or inp != out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inp, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for (B, 3, 32, 32) inputs and ``classes`` logits."""

    def __init__(self, classes: int = 10, stem: str = "imagenet", width: int = 64):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"Invalid stem={stem!r}: must be one of {STEMS}.")
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            )
        stages: list[nn.Module] = []
        inp = width
        for i, out in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(inp, out, stride), BasicBlock(out, out, 1)))
            inp = out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inp, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet18(classes: int = 10, stem: str = "imagenet", width: int = 64) -> ResNet18:
    return ResNet18(classes=classes, stem=stem, width=width)
