"""ResNet-18 for 32x32 images.

He et al., "Deep Residual Learning for Image Recognition" (2015),
https://arxiv.org/abs/1512.03385, in the CIFAR form of kuangliu/pytorch-cifar
(models/resnet.py): a 3x3 stride-1 stem and no max-pool, so layer1 runs at
32x32 and layer4 at 4x4, then global average pooling and Linear(512, classes).

What changed from kuangliu's file: the normalisation layer is a choice
(``bn``, ``gn`` with 32 groups, ``ln`` = GroupNorm with one group; see
``model/norm.py``), the ReLUs are not in-place (Grad-CAM hooks sit on block
outputs), and pooling is adaptive so other input sizes do not break the head.
11,173,962 trainable parameters for 10 classes, with every norm.
"""
import torch.nn as nn
import torch.nn.functional as F

from .norm import make_norm


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1, norm="bn"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = make_norm(norm, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                make_norm(norm, planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, block, num_blocks, num_classes=10, norm="bn"):
        super().__init__()
        self.in_planes = 64
        self.norm = norm
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = make_norm(norm, 64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)   # 32x32
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)  # 16x16
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)  # 8x8
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)  # 4x4
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s, self.norm))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # (B, 512)
        return self.linear(out)


def resnet18(num_classes=10, norm="bn"):
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, norm)
