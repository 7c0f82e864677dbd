"""Small convolutional networks that the tests grow, written like torchvision writes them.

Parameter names follow torchvision (``conv1``, ``bn1``, ``layer1.0.downsample.0``,
``features.1.block.0.0``, ``denseblock1.denselayer1.norm1``, ``Mixed_5b.branch1x1.conv``);
the families cover what convolutional networks do with channels:

- ``resnet_basic`` / ``resnext``: BatchNorm, residual adds, downsample branches, max and
  adaptive average pooling, ``torch.flatten(x, 1)`` into a Linear head; ``resnext`` uses
  Bottleneck blocks with grouped 3x3 convolutions;
- ``mobilenet``: MobileNetV2/V3/EfficientNet inverted residuals: depthwise convolutions,
  ReLU6/Hardswish/SiLU, squeeze-excitation (``x * sigmoid(fc2(relu(fc1(pool(x)))))`` with
  1x1 convolutions, a ``[B, C, 1, 1]`` scale broadcast over the image);
- ``densenet`` / ``inception``: channel concatenation (dense connectivity, parallel
  branches), average-pool transitions, a depthwise convolution with a channel multiplier;
- ``groupnorm_cnn``: GroupNorm (module and ``F.group_norm``), a grouped convolution, an
  InstanceNorm, adaptive max pooling; ``gn1_cnn``: GroupNorm with a single group;
- ``flatten_linear``: a LeNet-like net whose ``x.flatten(1)`` of ``[B, C, H, W]`` feeds a
  Linear; ``functional_cnn``: the same with ``F.conv2d``/``F.batch_norm``/``F.max_pool2d``
  spellings and parameters read directly;
- ``convnext``: depthwise 7x7 convolutions, channels-last ``permute`` + LayerNorm + Linear
  MLP + layer scale, a channels-first LayerNorm written with permutes.

Every constructor takes a ``width`` (all channel counts are multiples of it), so the model
``build(width=2 * w)`` has the shapes of the grown one. Norm parameters and running stats are
randomized so that normalization layers are not the identity.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

BATCH = 2
IMAGE = 16
NUM_CLASSES = 10

NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm non-trivial affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, NORMS):
                continue
            for name, t in list(m.named_parameters(recurse=False)) + list(
                    m.named_buffers(recurse=False)):
                if not t.is_floating_point():
                    continue
                noise = torch.randn(t.shape, generator=g, dtype=t.dtype)
                if name == "running_var":
                    t.copy_(0.5 + noise.abs())
                elif name == "weight":
                    t.copy_(1.0 + 0.3 * noise)
                else:
                    t.copy_(0.3 * noise)
    return model


# --------------------------------------------------------------------------------------------
# ResNet / ResNeXt (torchvision.models.resnet)
# --------------------------------------------------------------------------------------------


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, groups=groups,
                     bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet with two stages; ``width`` is the stem's (64 in torchvision)."""

    def __init__(self, block="basic", layers=(2, 1), width=8, groups=1, width_per_group=64,
                 num_classes=NUM_CLASSES):
        super().__init__()
        block = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
        self.inplanes = width
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2 * width * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups,
                                base_width=self.base_width))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


# --------------------------------------------------------------------------------------------
# MobileNetV2 / V3 / EfficientNet (torchvision.models.mobilenetv3, efficientnet)
# --------------------------------------------------------------------------------------------


class Conv2dNormActivation(nn.Sequential):
    def __init__(self, in_ch, out_ch, kernel_size=3, stride=1, groups=1, activation=nn.ReLU6):
        layers = [nn.Conv2d(in_ch, out_ch, kernel_size, stride, (kernel_size - 1) // 2,
                            groups=groups, bias=False), nn.BatchNorm2d(out_ch)]
        if activation is not None:
            layers.append(activation())
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: ``x * scale(fc2(act(fc1(avgpool(x)))))``."""

    def __init__(self, channels, squeeze, activation=nn.ReLU, scale_activation=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, x):
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return self.scale_activation(scale) * x


class InvertedResidual(nn.Module):
    def __init__(self, in_ch, out_ch, stride, expand, activation, se_scale=None):
        super().__init__()
        hidden = in_ch * expand
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers = [Conv2dNormActivation(in_ch, hidden, 1, activation=activation),
                  Conv2dNormActivation(hidden, hidden, 3, stride, groups=hidden,
                                       activation=activation)]
        if se_scale is not None:
            layers.append(SqueezeExcitation(hidden, hidden // 4, scale_activation=se_scale))
        layers.append(Conv2dNormActivation(hidden, out_ch, 1, activation=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        result = self.block(x)
        if self.use_res_connect:
            result = result + x
        return result


class MobileNet(nn.Module):
    def __init__(self, width=8, num_classes=NUM_CLASSES):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            Conv2dNormActivation(3, w, 3, stride=2, activation=nn.Hardswish),
            InvertedResidual(w, w, 1, 2, nn.ReLU6),  # MobileNetV2
            InvertedResidual(w, 3 * w // 2, 2, 2, nn.Hardswish, nn.Hardsigmoid),  # V3
            InvertedResidual(3 * w // 2, 3 * w // 2, 1, 2, nn.SiLU, nn.Sigmoid),  # EfficientNet
            Conv2dNormActivation(3 * w // 2, 4 * w, 1, activation=nn.Hardswish),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(4 * w, 3 * w), nn.Hardswish(),
                                        nn.Dropout(0.2), nn.Linear(3 * w, num_classes))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# --------------------------------------------------------------------------------------------
# DenseNet (torchvision.models.densenet) and Inception (torchvision.models.inception)
# --------------------------------------------------------------------------------------------


class _DenseLayer(nn.Module):
    def __init__(self, in_ch, growth_rate, bn_size):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_ch, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class _DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers, in_ch, growth_rate, bn_size):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}",
                            _DenseLayer(in_ch + i * growth_rate, growth_rate, bn_size))

    def forward(self, init):
        features = [init]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    def __init__(self, width=4, block_config=(2, 2), bn_size=2, num_classes=NUM_CLASSES):
        super().__init__()
        growth, init = width, 2 * width
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, init, 3, padding=1, bias=False)),
            ("norm0", nn.BatchNorm2d(init)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        ch = init
        for i, n in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", _DenseBlock(n, ch, growth, bn_size))
            ch += n * growth
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(ch, ch // 2))
                ch //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(ch))
        self.classifier = nn.Linear(ch, num_classes)

    def forward(self, x):
        out = F.relu(self.features(x))
        out = F.adaptive_avg_pool2d(out, (1, 1))
        return self.classifier(torch.flatten(out, 1))


class BasicConv2d(nn.Module):
    def __init__(self, in_ch, out_ch, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class InceptionBlock(nn.Module):
    """Parallel branches concatenated on channels; one branch is a depthwise convolution
    with channel multiplier 2 (``groups = in``, ``out = 2 in``)."""

    def __init__(self, in_ch, w):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, w, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_ch, w, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(w, w, kernel_size=3, padding=1)
        self.branch_dw_1 = BasicConv2d(in_ch, w // 2, kernel_size=1)
        self.branch_dw_2 = nn.Conv2d(w // 2, w, 3, padding=1, groups=w // 2)
        self.branch_pool = BasicConv2d(in_ch, w // 2, kernel_size=1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch_dw = F.relu(self.branch_dw_2(self.branch_dw_1(x)))
        branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(branch_pool)
        return torch.cat([branch1x1, branch3x3, branch_dw, branch_pool], 1)


class Inception(nn.Module):
    def __init__(self, width=4, num_classes=NUM_CLASSES):
        super().__init__()
        w = width
        self.Conv2d_1a_3x3 = BasicConv2d(3, 2 * w, kernel_size=3, stride=2, padding=1)
        self.Mixed_5b = InceptionBlock(2 * w, w)
        # a depthwise convolution reading the concatenation (channel multiplier 1)
        self.Mixed_5b_dw = nn.Conv2d(7 * w // 2, 7 * w // 2, 3, padding=1, groups=7 * w // 2)
        self.Mixed_5c = InceptionBlock(7 * w // 2, w)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(7 * w // 2, num_classes)

    def forward(self, x):
        x = self.Conv2d_1a_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        x = self.Mixed_5b(x)
        x = self.Mixed_5c(F.relu(self.Mixed_5b_dw(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


# --------------------------------------------------------------------------------------------
# GroupNorm networks
# --------------------------------------------------------------------------------------------


class GNBottleneck(nn.Module):
    """ResNeXt bottleneck with GroupNorm (4 channels per group) and a grouped 3x3 conv."""

    def __init__(self, ch, per_group=4):
        super().__init__()
        self.groups = ch // per_group
        self.conv1 = nn.Conv2d(ch, ch, 1, bias=False)
        self.gn1 = nn.GroupNorm(self.groups, ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, groups=self.groups, bias=False)
        self.gn2 = nn.GroupNorm(self.groups, ch)
        self.conv3 = nn.Conv2d(ch, ch, 1, bias=False)
        self.gn3_weight = nn.Parameter(1.0 + 0.3 * torch.randn(ch))
        self.gn3_bias = nn.Parameter(0.3 * torch.randn(ch))

    def forward(self, x):
        out = F.relu(self.gn1(self.conv1(x)))
        out = F.relu(self.gn2(self.conv2(out)))
        out = F.group_norm(self.conv3(out), self.groups, self.gn3_weight, self.gn3_bias, 1e-5)
        return F.relu(out + x)


class GroupNormCNN(nn.Module):
    def __init__(self, width=8, num_classes=NUM_CLASSES):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.stem_norm = nn.GroupNorm(width // 4, width)
        self.layer1 = nn.Sequential(GNBottleneck(width), GNBottleneck(width))
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.norm = nn.InstanceNorm2d(2 * width, affine=True)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = F.relu(self.stem_norm(self.stem(x)))
        x = self.layer1(x)
        x = F.gelu(self.norm(self.down(x)))
        return self.fc(self.pool(x).flatten(1))


class GN1CNN(nn.Module):
    """GroupNorm with one group (a LayerNorm over channels and positions)."""

    def __init__(self, width=8, num_classes=NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.norm1 = nn.GroupNorm(1, width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.conv2(F.gelu(self.norm1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


# --------------------------------------------------------------------------------------------
# Flatten into a Linear (LeNet / VGG heads)
# --------------------------------------------------------------------------------------------


class FlattenLinearCNN(nn.Module):
    """``x.flatten(1)`` of ``[B, C, 4, 4]``: the Linear's columns are ``[C, H, W]``."""

    def __init__(self, width=8, num_classes=NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 5, padding=2)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool2 = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(2 * width * 4 * 4, 4 * width)
        self.bn3 = nn.BatchNorm1d(4 * width)
        self.fc2 = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = self.pool2(F.relu(self.bn2(self.conv2(x))))
        x = x.flatten(1)
        return self.fc2(F.relu(self.bn3(self.fc1(x))))


class FunctionalCNN(nn.Module):
    """Parameters read directly: ``F.conv2d`` (plain and grouped), ``F.batch_norm`` with
    buffers, ``F.max_pool2d`` with indices, ``F.avg_pool2d``, ``F.adaptive_avg_pool2d``, and
    a ``view(B, -1)`` into ``F.linear``."""

    def __init__(self, width=8, num_classes=NUM_CLASSES):
        super().__init__()
        w = width
        self.groups = w // 4
        self.w1 = nn.Parameter(torch.randn(w, 3, 3, 3) / 5)
        self.b1 = nn.Parameter(torch.randn(w) / 5)
        self.bn_weight = nn.Parameter(1.0 + 0.3 * torch.randn(w))
        self.bn_bias = nn.Parameter(0.3 * torch.randn(w))
        self.register_buffer("bn_mean", 0.3 * torch.randn(w))
        self.register_buffer("bn_var", 0.5 + torch.rand(w))
        self.w2 = nn.Parameter(torch.randn(w, 4, 3, 3) / 6)
        self.w3 = nn.Parameter(torch.randn(2 * w, w, 1, 1) / 3)
        self.fc_weight = nn.Parameter(torch.randn(num_classes, 2 * w * 2 * 2) / 8)
        self.fc_bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, x):
        x = F.conv2d(x, self.w1, self.b1, padding=1)
        x = F.batch_norm(x, self.bn_mean, self.bn_var, self.bn_weight, self.bn_bias,
                         self.training, 0.1, 1e-5)
        x, _ = F.max_pool2d(F.relu(x), 2, return_indices=True)
        x = F.conv2d(x, self.w2, None, 1, 1, 1, self.groups)
        x = F.avg_pool2d(F.relu(x), 2)
        x = F.adaptive_avg_pool2d(F.conv2d(x, self.w3), (2, 2))
        return F.linear(x.view(x.size(0), -1), self.fc_weight, self.fc_bias)


# --------------------------------------------------------------------------------------------
# ConvNeXt (torchvision.models.convnext)
# --------------------------------------------------------------------------------------------


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of ``[B, C, H, W]`` through a channels-last permute."""

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps
        self.channels = channels

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, (self.channels,), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    def __init__(self, dim, layer_scale=0.5):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x):
        residual = x
        x = self.dwconv(x).permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = (self.gamma * x).permute(0, 3, 1, 2)
        return residual + x


class ConvNeXt(nn.Module):
    def __init__(self, width=8, num_classes=NUM_CLASSES):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 4, stride=4), LayerNorm2d(width))
        self.stages = nn.Sequential(
            nn.Sequential(CNBlock(width), CNBlock(width)),
            nn.Sequential(LayerNorm2d(width), nn.Conv2d(width, 2 * width, 2, stride=2)),
            nn.Sequential(CNBlock(2 * width)),
        )
        self.norm = nn.LayerNorm(2 * width, eps=1e-6)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.head(self.norm(x.mean([-2, -1])))


# --------------------------------------------------------------------------------------------
# The zoo
# --------------------------------------------------------------------------------------------


def images(g: torch.Generator, batch: int = BATCH) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 3, IMAGE, IMAGE, generator=g, dtype=torch.float64),)


@dataclass
class CNNEntry:
    name: str
    family: str
    cls: type
    kwargs: dict = field(default_factory=dict)
    width: int = 8
    # how a 1.5x bare plan ends: "exact", or (error type name, text it must contain)
    at_1_5x: object = "exact"
    has_batchnorm: bool = True
    # constructor arguments of the model with the 2x grown shapes, besides width
    kwargs_2x: dict | None = None
    example_inputs: Callable[[torch.Generator], tuple] = images

    def build(self, width: int | None = None, **overrides) -> nn.Module:
        model = self.cls(width=width or self.width, **{**self.kwargs, **overrides})
        return randomize_norms(model)

    def build_2x(self) -> nn.Module:
        """The same family at twice the width: the shapes ``grow(width=2.0)`` makes."""
        return self.build(2 * self.width, **(self.kwargs_2x or {}))


CNN_ZOO: dict[str, CNNEntry] = {
    e.name: e for e in [
        CNNEntry("resnet_basic", "resnet", ResNet, {"block": "basic"}),
        # 2x grows the number of groups (2 -> 4) and keeps 4 channels per group
        CNNEntry("resnext", "resnet", ResNet, {"block": "bottleneck", "layers": (1, 1),
                                                "groups": 2}, width=4,
                 kwargs_2x={"groups": 4, "width_per_group": 32}),
        CNNEntry("mobilenet", "mobilenet", MobileNet),
        CNNEntry("densenet", "densenet", DenseNet, width=4),
        CNNEntry("inception", "densenet", Inception, width=4),
        CNNEntry("groupnorm_cnn", "groupnorm", GroupNormCNN, has_batchnorm=False),
        CNNEntry("gn1_cnn", "groupnorm", GN1CNN, has_batchnorm=False,
                 at_1_5x=("NotLosslessError", "GroupNorm with one group")),
        CNNEntry("flatten_linear", "flatten", FlattenLinearCNN),
        CNNEntry("functional_cnn", "flatten", FunctionalCNN),
        CNNEntry("convnext", "convnext", ConvNeXt, has_batchnorm=False,
                 at_1_5x=("NotLosslessError", "needs its input in the avg form")),
    ]
}
