"""The custom ResNet ("ResNet9") for CIFAR-10.

David Page, "How to train your ResNet" (2018),
https://myrtle.ai/learn/how-to-train-your-resnet-4-architecture/, the network
that trained to 94% in 24 epochs in DAWNBench:

    PrepLayer  Conv3x3(64) > BN > ReLU                                   32x32
    Layer1     X = Conv3x3(128) > MaxPool(2) > BN > ReLU                 16x16
               out = X + ResBlock(X), ResBlock = (Conv3x3 > BN > ReLU) x 2
    Layer2     Conv3x3(256) > MaxPool(2) > BN > ReLU                     8x8
    Layer3     like Layer1 at 512                                        4x4
    MaxPool(4) > Linear(512, classes) > x 0.125  (softmax belongs to the loss)

What changed from Page: the convolutions carry a bias, as in the assignment's
reference summary (6,575,370 parameters for 10 classes), the norm is a choice
(see ``model/norm.py``), and the
final pool is adaptive: the same as MaxPool2d(4) on 32x32 inputs, but it does
not silently break on other sizes. ReLUs are not in-place (Grad-CAM hooks).

Page's 0.125 scale of the logits is kept: it has no parameters, and without it
the freshly initialised net starts with large logits and diverges at the
learning rates One Cycle wants (the range test finds a far lower ceiling).
"""
import torch.nn as nn

from .norm import make_norm


class ConvBlock(nn.Sequential):
    """Conv3x3 > [MaxPool2d(2)] > Norm > ReLU."""

    def __init__(self, in_planes, planes, norm="bn", pool=False):
        layers = [nn.Conv2d(in_planes, planes, 3, padding=1, bias=True)]
        if pool:
            layers.append(nn.MaxPool2d(2))
        layers += [make_norm(norm, planes), nn.ReLU()]
        super().__init__(*layers)


class ResBlock(nn.Module):
    """x + (ConvBlock > ConvBlock)(x), both at the same width."""

    def __init__(self, planes, norm="bn"):
        super().__init__()
        self.conv1 = ConvBlock(planes, planes, norm)
        self.conv2 = ConvBlock(planes, planes, norm)

    def forward(self, x):
        return x + self.conv2(self.conv1(x))


class Layer(nn.Module):
    """ConvBlock with pooling, then an optional residual block on its output."""

    def __init__(self, in_planes, planes, norm="bn", residual=False):
        super().__init__()
        self.conv = ConvBlock(in_planes, planes, norm, pool=True)
        self.res = ResBlock(planes, norm) if residual else nn.Identity()

    def forward(self, x):
        return self.res(self.conv(x))


class CustomResNet(nn.Module):
    def __init__(self, num_classes=10, norm="bn"):
        super().__init__()
        self.prep = ConvBlock(3, 64, norm)
        self.layer1 = Layer(64, 128, norm, residual=True)
        self.layer2 = Layer(128, 256, norm)
        self.layer3 = Layer(256, 512, norm, residual=True)
        self.pool = nn.AdaptiveMaxPool2d(1)  # = MaxPool2d(4) at 4x4
        self.fc = nn.Linear(512, num_classes)
        self.logit_scale = 0.125  # Page's "Mul(0.125)"; see the module docstring

    def forward(self, x):
        out = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.fc(self.pool(out).flatten(1)) * self.logit_scale


def custom_resnet(num_classes=10, norm="bn"):
    return CustomResNet(num_classes, norm)
