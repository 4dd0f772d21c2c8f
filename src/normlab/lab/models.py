"""Image classifiers for the lab, each built around a normalization *spec* and a placement.

Written here because torchvision is not a dependency. Every model takes ``norm`` — a registry
spec such as ``"bn"``, ``"fbn:threshold=3"``, ``"frn"``, ``"gn:groups=8"``, ``"bn:gamma_init=0.1"``
or ``"none"`` (see :func:`normlab.list_norms`) — and builds every normalization from it:

* ``conv → norm → activation`` blocks call :func:`normlab.create_norm_act`, so ``"frn"`` gets
  its TLU *instead of* the ReLU, while ``"bn"`` keeps the ReLU ([SK20] §3: FRN+TLU replaces
  BN+ReLU);
* a norm right before a residual addition is built without activation
  (``create_norm(spec, C, act="none")``) and the activation after the addition is the spec's
  own (TLU for FRN) or ReLU;
* norms after fully connected layers see ``(N, C)`` inputs and are built with ``dim=1``;
* layers followed by a norm have no bias (the norm's β replaces it); with ``"none"`` they do.

Initialization follows [DF21] (§4): convolution weights Kaiming-normal
(fan-in, ReLU), fully connected weights uniform with fan-in bound (torch's default), all biases
0; norm parameters keep their own init (``gamma_init=`` in the spec).

>>> model = build_model("lenet5", norm="fbn:threshold=2", placement="fc2")  # [HA20] §IV.A
>>> model = build_model("resnet18", norm="frn", num_classes=10, in_channels=3, image_size=32)
>>> model = build_model("vgg", norm="bn", width=0.5)
>>> model = build_model("mlp", norm="bn", activation="sigmoid")  # [IS15] Fig. 1 net
>>> list_models()
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn

from ..registry import create_norm, create_norm_act, parse_spec, spec_activation
from ..nn import make_activation

__all__ = ["build_model", "list_models", "model_placements", "model_options", "MLP", "LeNet5",
           "SmallAlexNet", "SmallVGG", "ResNet", "PreActResNet", "MobileNetV2"]


# -- building blocks ----------------------------------------------------------------------------

def _is_none(norm: str) -> bool:
    return parse_spec(norm)[0] == "none"


def _norm_act(norm: str | None, channels: int, *, dim: int = 2,
              default_activation: Callable[[], nn.Module] = nn.ReLU) -> nn.Module:
    """``norm`` followed by its activation; ``None`` means no norm here, only the default
    activation (used for layers a placement leaves unnormalized)."""
    if norm is None:
        return default_activation()
    return create_norm_act(norm, channels, dim=dim, default_activation=default_activation)


def _norm_only(norm: str, channels: int, *, dim: int = 2) -> nn.Module:
    """``norm`` without any activation (before a residual addition or a linear projection)."""
    return create_norm(norm, channels, dim=dim, act="none")


def _post_add_activation(norm: str, channels: int,
                         default_activation: Callable[[], nn.Module] = nn.ReLU) -> nn.Module:
    """The activation after a residual addition: the spec's own (TLU for ``frn``) or ReLU."""
    own = spec_activation(norm)
    return make_activation(own, channels) if own is not None else default_activation()


def _conv(c_in: int, c_out: int, kernel: int, *, stride: int = 1, padding: int | None = None,
          groups: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, stride=stride,
                     padding=kernel // 2 if padding is None else padding, groups=groups,
                     bias=bias)


def _scaled(channels: int, width: float, *, multiple: int = 1) -> int:
    """``channels·width`` rounded to a multiple of ``multiple`` (at least ``multiple``)."""
    return max(multiple, int(round(channels * width / multiple)) * multiple)


def _init_weights(model: nn.Module) -> nn.Module:
    """[DF21] §4 init: conv Kaiming-normal (fan-in, ReLU), biases 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            # torch's default: uniform(±1/sqrt(fan_in)) weights; [DF21] §4 sets biases to 0
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def _pooled(size: int, kernel: int, stride: int, padding: int = 0, *, ceil: bool = False) -> int:
    span = size + 2 * padding - kernel
    return (-(-span // stride) if ceil else span // stride) + 1


# -- fully connected net (the BN paper's MNIST experiment) --------------------------------------

MLP_PLACEMENTS = ("pre", "post", "none", "all")
MLP_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}


class MLP(nn.Module):
    r"""Fully connected net: ``depth`` hidden layers of ``hidden`` units and a linear classifier.

    Each hidden layer is an ``nn.Sequential`` with named children, in this order:

    * ``placement="pre"`` (= ``"all"``): ``linear → norm → act`` — the norm on ``x = Wu + b``,
      before the nonlinearity (Ioffe & Szegedy 2015, arXiv 1502.03167, §3.2 and §4.1:
      "3 fully-connected hidden layers with 100 activations each … sigmoid nonlinearity"
      with BN added to each hidden layer);
    * ``placement="post"``: ``linear → act → norm`` — the norm on the nonlinearity's output
      ``u`` (the layer input of the next layer, what §3.2 argues against);
    * ``placement="none"`` or ``norm="none"``: ``linear → act``;

    then ``dropout`` (``nn.Dropout(p)``, only when ``dropout > 0``). Layers followed by a norm
    that has its own shift (β) keep their bias anyway, so the pre/post/none nets have the same
    linear layers. The nonlinearity is ``activation`` (sigmoid, relu, tanh) unless the spec
    carries its own (``"frn"`` → TLU, ``"bn:act=tlu"``). Norms see ``(N, C)`` inputs.

    Initialization (``build_model`` keeps it): every weight ``W ~ N(0, (s/√fan_in)²)`` with
    ``s = init_scale`` (1: LeCun's fan-in scale; the BN paper's "small random Gaussian
    values"), biases 0.
    """

    def __init__(self, norm: str = "bn", num_classes: int = 10, in_channels: int = 1,
                 image_size: int = 28, placement: str = "pre", *, depth: int = 3,
                 hidden: int = 100, activation: str = "sigmoid", dropout: float = 0.0,
                 init_scale: float = 1.0) -> None:
        super().__init__()
        if placement not in MLP_PLACEMENTS:
            raise ValueError(f"unknown placement {placement!r} for mlp; valid placements: "
                             f"pre (norm on Wu+b, before the nonlinearity; 'all' is the same), "
                             f"post (norm on u, after it), none")
        for name, value in (("depth", depth), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if activation not in MLP_ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(MLP_ACTIVATIONS)}, got "
                             f"{activation!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        if (isinstance(init_scale, bool) or not isinstance(init_scale, (int, float))
                or not 0 < init_scale < math.inf):
            raise ValueError(f"init_scale must be a number > 0 (× the fan-in scale 1/sqrt(fan_in)), "
                             f"got {init_scale!r}")
        where = "none" if _is_none(norm) else ("pre" if placement == "all" else placement)
        own = spec_activation(norm) if where != "none" else None
        self.placement, self.init_scale = where, float(init_scale)
        width = in_channels * image_size * image_size
        blocks = []
        for _ in range(depth):
            act = make_activation(own, hidden) if own is not None else MLP_ACTIVATIONS[activation]()
            parts: list[tuple[str, nn.Module]] = [("linear", nn.Linear(width, hidden))]
            norm_layer = (create_norm(norm, hidden, dim=1, act="none") if where != "none"
                          else None)
            if where == "pre":
                parts += [("norm", norm_layer), ("act", act)]
            elif where == "post":
                parts += [("act", act), ("norm", norm_layer)]
            else:
                parts.append(("act", act))
            if dropout > 0:
                parts.append(("dropout", nn.Dropout(float(dropout))))
            blocks.append(nn.Sequential(OrderedDict(parts)))
            width = hidden
        self.flatten = nn.Flatten()
        self.hidden = nn.Sequential(*blocks)
        self.classifier = nn.Linear(width, num_classes)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, self.init_scale / m.in_features ** 0.5)
                    m.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.hidden(self.flatten(x)))


# -- LeNet-5 ------------------------------------------------------------------------------------

LENET_LAYERS = ("conv1", "conv2", "fc1", "fc2")
LENET_PLACEMENTS = {
    "all": LENET_LAYERS,
    "none": (),
    "conv": ("conv1", "conv2"),
    "fc": ("fc1", "fc2"),
    "last": ("fc2",),
    **{layer: (layer,) for layer in LENET_LAYERS},
}


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pooling, normalization where ``placement`` says.

    ``conv1`` 5×5 (in→6, padding 2) → pool 2 → ``conv2`` 5×5 (6→16) → pool 2 → ``fc1`` (→120)
    → ``fc2`` (120→84) → logits (84→classes). Images smaller than 16 px pad ``conv2`` by 2 so
    that 8×8 digits fit. A norm "at" a layer sits between that layer and its ReLU.

    Placements: ``"all"`` (after conv1, conv2, fc1, fc2 — every layer but the logits, as
    [HA20] §III/§IV.B do), ``"none"``, ``"conv"``, ``"fc"``, a single layer
    ``"conv1"``, ``"conv2"``, ``"fc1"``, ``"fc2"`` ([HA20] appendix §III: BN after one chosen layer), or
    ``"last"`` = ``"fc2"``: the single norm between the last two fully connected layers of
    [HA20] §IV.A (Fig. 5). A comma-separated list (``"conv1,fc2"``) combines layers.
    """

    def __init__(self, norm: str = "bn", num_classes: int = 10, in_channels: int = 1,
                 image_size: int = 28, placement: str = "all", width: float = 1.0) -> None:
        super().__init__()
        layers = _lenet_layers(placement)
        none = _is_none(norm)
        at = {layer: (None if none or layer not in layers else norm) for layer in LENET_LAYERS}
        c1, c2 = _scaled(6, width), _scaled(16, width)
        f1, f2 = _scaled(120, width), _scaled(84, width)
        pad2 = 0 if image_size >= 16 else 2
        s = _pooled(image_size, 2, 2)
        s = _pooled(s + 2 * pad2 - 4, 2, 2)
        if s < 1:
            raise ValueError(f"lenet5 needs image_size >= 4, got {image_size}")
        self.features = nn.Sequential(
            _conv(in_channels, c1, 5, padding=2, bias=at["conv1"] is None),
            _norm_act(at["conv1"], c1), nn.MaxPool2d(2),
            _conv(c1, c2, 5, padding=pad2, bias=at["conv2"] is None),
            _norm_act(at["conv2"], c2), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * s * s, f1, bias=at["fc1"] is None), _norm_act(at["fc1"], f1, dim=1),
            nn.Linear(f1, f2, bias=at["fc2"] is None), _norm_act(at["fc2"], f2, dim=1),
            nn.Linear(f2, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _lenet_layers(placement: str) -> tuple[str, ...]:
    if not isinstance(placement, str):
        raise ValueError(f"placement must be a string, got {placement!r}")
    chosen: list[str] = []
    for part in (p.strip().lower() for p in placement.split(",")):
        if part not in LENET_PLACEMENTS:
            raise ValueError(f"unknown placement {part!r} for lenet5; valid placements: "
                             f"{', '.join(LENET_PLACEMENTS)} (or a comma-separated list of "
                             f"{', '.join(LENET_LAYERS)})")
        chosen += [layer for layer in LENET_PLACEMENTS[part] if layer not in chosen]
    return tuple(chosen)


# -- AlexNet-style and VGG-style ----------------------------------------------------------------

class SmallAlexNet(nn.Module):
    """AlexNet-style net for 28–32 px images (the cuda-convnet shape of AlexNet for CIFAR).

    Five convolutions (5×5, 5×5, 3×3, 3×3, 3×3; 64, 128, 256, 256, 128 channels × ``width``)
    with 3×3/stride-2 max-pooling after the 1st, 2nd and 5th, then two hidden fully connected
    layers (512, 256 × ``width``) and the logits. ``placement``: ``"all"`` (norm after every
    convolution and hidden FC layer, [HA20] §IV.B), ``"conv"``, ``"fc"``.
    """

    def __init__(self, norm: str = "bn", num_classes: int = 10, in_channels: int = 3,
                 image_size: int = 32, placement: str = "all", width: float = 1.0) -> None:
        super().__init__()
        conv_norm, fc_norm = _conv_fc_placement("alexnet", norm, placement)
        c = [_scaled(v, width) for v in (64, 128, 256, 256, 128)]
        f = [_scaled(v, width) for v in (512, 256)]
        blocks: list[nn.Module] = []
        c_in, s = in_channels, image_size
        for i, (c_out, k) in enumerate(zip(c, (5, 5, 3, 3, 3))):
            blocks += [_conv(c_in, c_out, k, bias=conv_norm is None), _norm_act(conv_norm, c_out)]
            if i in (0, 1, 4):
                blocks.append(nn.MaxPool2d(3, stride=2, padding=1))
                s = _pooled(s, 3, 2, 1)
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c_in * s * s, f[0], bias=fc_norm is None), _norm_act(fc_norm, f[0], dim=1),
            nn.Linear(f[0], f[1], bias=fc_norm is None), _norm_act(fc_norm, f[1], dim=1),
            nn.Linear(f[1], num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


VGG_CONFIG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M")


class SmallVGG(nn.Module):
    """VGG-style net: VGG-11's first eight 3×3 convolutions at half width, four 2×2 max-pools.

    Channels ``(32, M, 64, M, 128, 128, M, 256, 256, M)`` × ``width`` (``width=2`` is VGG-11's
    64…512), global average pooling, two hidden fully connected layers (256 × ``width``) and the
    logits. ``placement``: ``"all"`` (after every conv and hidden FC layer, as VGG-16-BN in the
    [HA20] §IV.C), ``"conv"``, ``"fc"``.
    """

    def __init__(self, norm: str = "bn", num_classes: int = 10, in_channels: int = 3,
                 image_size: int = 32, placement: str = "all", width: float = 1.0) -> None:
        super().__init__()
        conv_norm, fc_norm = _conv_fc_placement("vgg", norm, placement)
        blocks: list[nn.Module] = []
        c_in = in_channels
        for item in VGG_CONFIG:
            if item == "M":
                blocks.append(nn.MaxPool2d(2, ceil_mode=True))
                continue
            c_out = _scaled(int(item) // 2, width)
            blocks += [_conv(c_in, c_out, 3, bias=conv_norm is None), _norm_act(conv_norm, c_out)]
            c_in = c_out
        hidden = _scaled(256, width)
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c_in, hidden, bias=fc_norm is None), _norm_act(fc_norm, hidden, dim=1),
            nn.Linear(hidden, hidden, bias=fc_norm is None), _norm_act(fc_norm, hidden, dim=1),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


def _conv_fc_placement(model: str, norm: str, placement: str) -> tuple[str | None, str | None]:
    choices = {"all": (True, True), "conv": (True, False), "fc": (False, True),
               "none": (False, False)}
    if placement not in choices:
        raise ValueError(f"unknown placement {placement!r} for {model}; valid placements: "
                         f"{', '.join(choices)}")
    if _is_none(norm):
        return None, None
    conv, fc = choices[placement]
    return (norm if conv else None), (norm if fc else None)


# -- ResNets (CIFAR stem) -----------------------------------------------------------------------

class BasicBlock(nn.Module):
    """ResNet v1 basic block: ``act(norm(conv(act(norm(conv(x))))) + shortcut(x))``."""

    expansion = 1

    def __init__(self, norm: str, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        bias = _is_none(norm)
        self.conv1 = _conv(c_in, planes, 3, stride=stride, bias=bias)
        self.norm1 = _norm_act(norm, planes)
        self.conv2 = _conv(planes, planes, 3, bias=bias)
        self.norm2 = _norm_only(norm, planes)
        self.shortcut = _shortcut(norm, c_in, planes, stride)
        self.act = _post_add_activation(norm, planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.norm1(self.conv1(x))))
        return self.act(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet v1 bottleneck: 1×1 → 3×3 (stride) → 1×1 (×4 channels), norm after each."""

    expansion = 4

    def __init__(self, norm: str, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        bias = _is_none(norm)
        c_out = planes * self.expansion
        self.conv1 = _conv(c_in, planes, 1, bias=bias)
        self.norm1 = _norm_act(norm, planes)
        self.conv2 = _conv(planes, planes, 3, stride=stride, bias=bias)
        self.norm2 = _norm_act(norm, planes)
        self.conv3 = _conv(planes, c_out, 1, bias=bias)
        self.norm3 = _norm_only(norm, c_out)
        self.shortcut = _shortcut(norm, c_in, c_out, stride)
        self.act = _post_add_activation(norm, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm1(self.conv1(x))
        out = self.norm2(self.conv2(out))
        out = self.norm3(self.conv3(out))
        return self.act(out + self.shortcut(x))


def _shortcut(norm: str, c_in: int, c_out: int, stride: int) -> nn.Module:
    """Identity, or a 1×1 projection + norm (ResNet option B) when the shape changes."""
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(_conv(c_in, c_out, 1, stride=stride, bias=_is_none(norm)),
                         _norm_only(norm, c_out))


class ResNet(nn.Module):
    """ResNet-18/34/50 (He et al. 2016) with the CIFAR stem of [DF21] §4.

    Stem: 3×3 stride-1 convolution (64 × ``width`` channels) → norm → activation, *no* max-pool
    (``stem="imagenet"``: He et al.'s 7×7 stride-2 convolution → norm → activation → 3×3
    stride-2 max-pool, for 224-px images); four stages of ``blocks`` blocks (64, 128, 256, 512 × ``width`` planes; stride 1, 2, 2, 2),
    global average pooling, a linear classifier. At width 1 with 10 classes ResNet-18 has
    11,173,962 parameters with BN.
    """

    def __init__(self, block: type[nn.Module], blocks: tuple[int, ...], norm: str = "bn",
                 num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                 stem: str = "cifar") -> None:
        super().__init__()
        planes = [_scaled(v, width) for v in (64, 128, 256, 512)]
        if _check_stem(stem) == "imagenet":
            self.stem = nn.Sequential(
                _conv(in_channels, planes[0], 7, stride=2, bias=_is_none(norm)),
                _norm_act(norm, planes[0]), nn.MaxPool2d(3, stride=2, padding=1))
        else:
            self.stem = nn.Sequential(_conv(in_channels, planes[0], 3, bias=_is_none(norm)),
                                      _norm_act(norm, planes[0]))
        stages, c_in = [], planes[0]
        for i, (p, n) in enumerate(zip(planes, blocks)):
            layer = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layer.append(block(norm, c_in, p, stride))
                c_in = p * block.expansion
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class _PreActUnit(nn.Module):
    """What both pre-activation blocks share: the first norm-act feeds the residual branch
    (:meth:`residual`) and, when the shape changes, the 1×1 projection shortcut."""

    shortcut: nn.Module | None

    def residual(self, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def projection(c_in: int, c_out: int, stride: int) -> nn.Module | None:
        """The shortcut: identity (``None``) or a 1×1 convolution with the block's stride."""
        return (None if stride == 1 and c_in == c_out
                else _conv(c_in, c_out, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm1(x)
        skip = x if self.shortcut is None else self.shortcut(out)
        return self.residual(out) + skip


class PreActBlock(_PreActUnit):
    """Pre-activation (ResNetV2) basic block: ``x + conv(act(norm(conv(act(norm(x))))))``.

    He et al. 2016b; [SK20] trains ResNetV2 with FRN+TLU in place of every BN+ReLU.
    """

    def __init__(self, norm: str, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        bias = _is_none(norm)
        self.norm1 = _norm_act(norm, c_in)
        self.conv1 = _conv(c_in, planes, 3, stride=stride, bias=bias)
        self.norm2 = _norm_act(norm, planes)
        self.conv2 = _conv(planes, planes, 3, bias=bias)
        self.shortcut = self.projection(c_in, planes, stride)

    def residual(self, out: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.norm2(self.conv1(out)))


class PreActBottleneck(_PreActUnit):
    """Pre-activation bottleneck (ResNetV2-50, He et al. 2016b): norm-act → 1×1 → norm-act →
    3×3 (stride) → norm-act → 1×1 (×4 channels), added to the (projected) input."""

    expansion = 4

    def __init__(self, norm: str, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        bias = _is_none(norm)
        c_out = planes * self.expansion
        self.norm1 = _norm_act(norm, c_in)
        self.conv1 = _conv(c_in, planes, 1, bias=bias)
        self.norm2 = _norm_act(norm, planes)
        self.conv2 = _conv(planes, planes, 3, stride=stride, bias=bias)
        self.norm3 = _norm_act(norm, planes)
        self.conv3 = _conv(planes, c_out, 1, bias=bias)
        self.shortcut = self.projection(c_in, c_out, stride)

    def residual(self, out: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.norm3(self.conv2(self.norm2(self.conv1(out)))))


class PreActResNet(nn.Module):
    """Pre-activation ResNet-18 or -50 (ResNetV2) with the CIFAR stem (or ``stem="imagenet"``,
    7×7 stride-2 convolution and 3×3 stride-2 max-pool); a final norm → activation before
    pooling, as in He et al. 2016b. The ResNetV2-50 of [SK20] is ``preact_resnet50``."""

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), norm: str = "bn",
                 num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                 stem: str = "cifar", block: type[nn.Module] = PreActBlock) -> None:
        super().__init__()
        planes = [_scaled(v, width) for v in (64, 128, 256, 512)]
        if _check_stem(stem) == "imagenet":
            self.stem = nn.Sequential(
                _conv(in_channels, planes[0], 7, stride=2, bias=_is_none(norm)),
                nn.MaxPool2d(3, stride=2, padding=1))
        else:
            self.stem = _conv(in_channels, planes[0], 3, bias=_is_none(norm))
        expansion = getattr(block, "expansion", 1)
        stages, c_in = [], planes[0]
        for i, (p, n) in enumerate(zip(planes, blocks)):
            layer = []
            for j in range(n):
                layer.append(block(norm, c_in, p, 2 if (i > 0 and j == 0) else 1))
                c_in = p * expansion
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.final = _norm_act(norm, c_in)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(self.final(x)), 1))


# -- MobileNetV2 --------------------------------------------------------------------------------

MOBILENET_CONFIG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                    (6, 160, 3, 2), (6, 320, 1, 1))  # (expansion t, channels c, repeats n, stride s)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand → norm-act → 3×3 depthwise → norm-act → 1×1 project →
    norm (linear bottleneck, no activation); ``+ x`` when stride 1 and channels match."""

    def __init__(self, norm: str, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        bias = _is_none(norm)
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [_conv(c_in, hidden, 1, bias=bias), _norm_act(norm, hidden,
                                                                     default_activation=nn.ReLU6)]
        layers += [_conv(hidden, hidden, 3, stride=stride, groups=hidden, bias=bias),
                   _norm_act(norm, hidden, default_activation=nn.ReLU6),
                   _conv(hidden, c_out, 1, bias=bias), _norm_only(norm, c_out)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) for small images: 3×3 stride-1 stem (32 × ``width``),
    the paper's seven stages with the second stage at stride 1 (three stride-2 stages in all,
    32 px → 4 px), a 1×1 convolution to 1280 channels, global pooling and the classifier.
    Channel counts × ``width`` are rounded to multiples of 8; ReLU6 unless the spec has its own
    activation (``"frn"`` → TLU)."""

    def __init__(self, norm: str = "bn", num_classes: int = 10, in_channels: int = 3,
                 width: float = 1.0) -> None:
        super().__init__()
        bias = _is_none(norm)
        c_in = _scaled(32, width, multiple=8)
        layers: list[nn.Module] = [_conv(in_channels, c_in, 3, bias=bias),
                                   _norm_act(norm, c_in, default_activation=nn.ReLU6)]
        for t, c, n, s in MOBILENET_CONFIG:
            c_out = _scaled(c, width, multiple=8)
            for i in range(n):
                layers.append(InvertedResidual(norm, c_in, c_out, s if i == 0 else 1, t))
                c_in = c_out
        last = _scaled(1280, max(1.0, width), multiple=8)
        layers += [_conv(c_in, last, 1, bias=bias),
                   _norm_act(norm, last, default_activation=nn.ReLU6)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


# -- registry -----------------------------------------------------------------------------------

def _single_placement(model: str, placement: str) -> None:
    if placement != "all":
        raise ValueError(f"unknown placement {placement!r} for {model}; valid placements: all "
                         f"(use norm='none' for a model without normalization)")


STEMS = ("cifar", "imagenet")


def _check_stem(stem: Any) -> str:
    if stem not in STEMS:
        raise ValueError(f"stem must be 'cifar' (3x3 stride 1, no max-pool) or 'imagenet' "
                         f"(7x7 stride 2 + max-pool), got {stem!r}")
    return stem


def _resnet(block, blocks, model):
    def build(norm, num_classes, in_channels, image_size, placement, width=1.0, stem="cifar"):
        _single_placement(model, placement)
        return ResNet(block, blocks, norm, num_classes, in_channels, width, stem)
    return build


def _preact(block, blocks, model):
    def build(norm, num_classes, in_channels, image_size, placement, width=1.0, stem="cifar"):
        _single_placement(model, placement)
        return PreActResNet(blocks, norm, num_classes, in_channels, width, stem, block)
    return build


def _mobilenet(norm, num_classes, in_channels, image_size, placement, width=1.0):
    _single_placement("mobilenetv2", placement)
    return MobileNetV2(norm, num_classes, in_channels, width)


_MODELS: dict[str, tuple[Callable[..., nn.Module], str, tuple[str, ...]]] = {
    "lenet5": (LeNet5, "LeNet-5 (ReLU, max-pool); placement all|none|conv|fc|conv1|conv2|fc1|"
               "fc2|last", tuple(LENET_PLACEMENTS)),
    "alexnet": (SmallAlexNet, "small AlexNet-style net for 28-32 px (5 conv + 2 FC)",
                ("all", "conv", "fc", "none")),
    "vgg": (SmallVGG, "small VGG-style net (8 conv at half VGG-11 width, 2 FC)",
            ("all", "conv", "fc", "none")),
    "resnet18": (_resnet(BasicBlock, (2, 2, 2, 2), "resnet18"),
                 "ResNet-18, CIFAR stem (3x3 stride-1 conv, no max-pool)", ("all",)),
    "resnet34": (_resnet(BasicBlock, (3, 4, 6, 3), "resnet34"),
                 "ResNet-34, CIFAR stem", ("all",)),
    "resnet50": (_resnet(Bottleneck, (3, 4, 6, 3), "resnet50"),
                 "ResNet-50 (bottleneck), CIFAR stem", ("all",)),
    "preact_resnet18": (_preact(PreActBlock, (2, 2, 2, 2), "preact_resnet18"),
                        "pre-activation ResNet-18 (ResNetV2), CIFAR stem", ("all",)),
    "mobilenetv2": (_mobilenet, "MobileNetV2 for small images (stride-1 stem)", ("all",)),
    "preact_resnet50": (_preact(PreActBottleneck, (3, 4, 6, 3), "preact_resnet50"),
                        "pre-activation ResNet-50 (ResNetV2-50, the model of [SK20])",
                        ("all",)),
    "mlp": (MLP, "fully connected net ([IS15] Fig. 1: 3 x 100 sigmoid units); placement "
            "pre|post|none; options depth, hidden, activation, dropout, init_scale",
            MLP_PLACEMENTS),
}


def list_models() -> dict[str, str]:
    """``{name: one-line description}`` of every model :func:`build_model` knows."""
    return {name: description for name, (_, description, _) in _MODELS.items()}


#: what every model factory takes besides its options
_BUILD_ARGS = ("norm", "num_classes", "in_channels", "image_size", "placement")


def model_options(name: str) -> dict[str, Any]:
    """The options model ``name`` accepts (``--model-option K=V``), with their defaults: the
    keyword parameters of its factory beyond :data:`_BUILD_ARGS`."""
    factory = _entry(name)[0]
    return {p.name: p.default for p in inspect.signature(factory).parameters.values()
            if p.name not in _BUILD_ARGS}


def model_placements(name: str) -> tuple[str, ...]:
    """The placement names ``name`` accepts (``lenet5`` also takes comma-separated lists)."""
    return _entry(name)[2]


def _entry(name: str):
    if not isinstance(name, str) or name.lower() not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(_MODELS)}")
    return _MODELS[name.lower()]


def build_model(name: str, *, norm: str = "bn", num_classes: int = 10, in_channels: int = 1,
                image_size: int = 28, placement: str = "all", **options: Any) -> nn.Module:
    """Build model ``name`` with every normalization made from the spec ``norm``.

    Args:
        name: one of :func:`list_models`.
        norm: a registry spec (``"bn"``, ``"fbn:threshold=3"``, ``"frn"``, ``"none"``, ...).
        num_classes, in_channels, image_size: the data's shape (square images).
        placement: where the norms go; ``"all"`` everywhere (see :func:`model_placements`).
        options: see :func:`model_options` — ``width`` (float > 0, default 1): channel
            multiplier, for CPU-scale runs; ``stem`` (``"cifar"``/``"imagenet"``) for the
            ResNets; ``depth``, ``hidden``, ``activation``, ``dropout``, ``init_scale`` for
            ``mlp``.

    The model carries ``model.config`` (the arguments it was built with).
    """
    factory, _, _ = _entry(name)
    name = name.lower()
    parse_spec(norm)  # validates the spec, with the registry's message
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels),
                       ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{key} must be a positive int, got {value!r}")
    valid = model_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} for model "
                         f"{name!r}; valid options: {', '.join(valid)}")
    options = dict(valid, **options)
    if "width" in options:
        width = options["width"]
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width < math.inf:
            raise ValueError(f"width must be a positive number, got {width!r}")
        options["width"] = float(width)
    if factory in (LeNet5, SmallAlexNet, SmallVGG):
        model = factory(norm, num_classes, in_channels, image_size, placement, options["width"])
    else:
        model = factory(norm, num_classes, in_channels, image_size, placement, **options)
    _init_weights(model)
    model.config = {"name": name, "norm": norm, "num_classes": num_classes,
                    "in_channels": in_channels, "image_size": image_size,
                    "placement": placement, **options}
    return model
