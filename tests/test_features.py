"""The frozen-feature cache: computed once per (encoder + preprocessing, image), invalidated when either changes."""

import warnings

import torch
from PIL import Image

from vlmlab.data.features import FeatureCache
from vlmlab.model.vision import build_vision_encoder


class Counting(torch.nn.Module):
    """Wraps an encoder and counts the images it encodes."""

    def __init__(self, encoder):
        super().__init__()
        self.inner, self.count = encoder, 0

    def fingerprint(self):
        return self.inner.fingerprint()

    def preprocess(self, images):
        return self.inner.preprocess(images)

    def forward(self, pixels):
        self.count += pixels.shape[0]
        return self.inner(pixels)


def _images(folder, n):
    paths = []
    for i in range(n):
        p = folder / f"{i}.png"
        Image.new("RGB", (40, 30), (i * 40 % 256, 100, 200)).save(p)
        paths.append(str(p))
    return paths


def test_computed_once_and_reused_across_instances(tmp_path, tiny_clip_dir):
    paths = _images(tmp_path, 5)
    enc = Counting(build_vision_encoder(f"hf:{tiny_clip_dir}"))
    feats, kept = FeatureCache(tmp_path / "cache", enc).features(paths, batch_size=2)
    assert feats.shape == (5, 16, 32) and feats.dtype == torch.float16 and kept == list(range(5))
    assert enc.count == 5
    # a new cache object (a new run) reads from disk: nothing is encoded again
    again, _ = FeatureCache(tmp_path / "cache", enc).features(paths)
    assert enc.count == 5 and torch.equal(feats, again)
    # the cached features are the encoder's own output
    direct = enc.inner(enc.preprocess([Image.open(paths[3]).convert("RGB")]))[0].half()
    assert torch.allclose(feats[3].float(), direct.float(), atol=1e-2)


def test_changed_image_is_re_encoded(tmp_path, tiny_clip_dir):
    paths = _images(tmp_path, 3)
    enc = Counting(build_vision_encoder(f"hf:{tiny_clip_dir}"))
    before, _ = FeatureCache(tmp_path / "cache", enc).features(paths)
    Image.new("RGB", (40, 30), (0, 0, 0)).save(paths[1])
    after, _ = FeatureCache(tmp_path / "cache", enc).features(paths)
    assert enc.count == 4  # only the edited image
    assert torch.equal(before[0], after[0]) and not torch.equal(before[1], after[1])


def test_changed_preprocessing_misses_the_cache(tmp_path, tiny_clip_dir):
    paths = _images(tmp_path, 2)
    small = build_vision_encoder(f"hf:{tiny_clip_dir}")
    other = build_vision_encoder(f"hf:{tiny_clip_dir}", image_size=48)
    assert small.fingerprint() != other.fingerprint()
    FeatureCache(tmp_path / "cache", small).features(paths)
    counting = Counting(other)
    FeatureCache(tmp_path / "cache", counting).features(paths)
    assert counting.count == 2


def test_unreadable_images_are_skipped_with_one_warning(tmp_path, tiny_clip_dir):
    paths = _images(tmp_path, 4)
    (tmp_path / "empty.jpg").write_bytes(b"")
    good = (tmp_path / "0.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    paths += [str(tmp_path / "empty.jpg"), str(tmp_path / "truncated.png"), str(tmp_path / "missing.jpg")]
    enc = build_vision_encoder(f"hf:{tiny_clip_dir}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        feats, kept = FeatureCache(tmp_path / "cache", enc).features(paths)
    assert kept == [0, 1, 2, 3] and feats.shape[0] == 4
    messages = [str(w.message) for w in caught if "could not be read" in str(w.message)]
    assert len(messages) == 1 and "skipped 3 of 7" in messages[0]
