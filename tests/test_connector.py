"""The Q-Former connector: shapes, the starting scale of visual tokens, and that it reads the image."""

import pytest
import torch

from vlmlab.config import ConnectorConfig
from vlmlab.model.connector import QFormerConnector, build_connector, merge_grid


def test_shapes_and_attention():
    torch.manual_seed(0)
    q = QFormerConnector(image_dim=40, lm_dim=24, num_image_tokens=49, num_queries=8, depth=3, width=32, heads=4)
    image = torch.randn(2, 49, 40)
    visual, attention = q(image, return_attention=True)
    assert visual.shape == (2, 8, 24)
    assert len(attention) == 3 and attention[0].shape == (2, 8, 49)
    assert torch.allclose(attention[-1].sum(-1), torch.ones(2, 8), atol=1e-5)  # a distribution over image tokens


@pytest.mark.parametrize("rms", [0.05, 0.14, 1.0])
def test_visual_tokens_start_at_the_scale_of_word_embeddings(rms):
    torch.manual_seed(0)
    q = QFormerConnector(image_dim=1280, lm_dim=576, num_image_tokens=49, num_queries=16, lm_embedding_rms=rms)
    image = torch.rand(4, 49, 1280) * 6  # ReLU6-like feature maps: far from unit scale
    out_rms = q(image).pow(2).mean().sqrt().item()
    assert rms / 1.5 < out_rms < rms * 1.5


def test_output_depends_on_the_image_and_gradients_reach_queries():
    torch.manual_seed(0)
    q = QFormerConnector(image_dim=16, lm_dim=8, num_image_tokens=9, num_queries=4, depth=1, width=16, heads=2)
    a, b = torch.randn(1, 9, 16), torch.randn(1, 9, 16)
    assert not torch.allclose(q(a), q(b))
    q(a).sum().backward()
    assert q.queries.grad is not None and q.queries.grad.abs().sum() > 0
    assert q.image_in.weight.grad.abs().sum() > 0


def test_bad_shapes_and_names_are_refused():
    with pytest.raises(ValueError):
        QFormerConnector(image_dim=8, lm_dim=8, num_image_tokens=4, num_queries=0)
    with pytest.raises(ValueError):
        QFormerConnector(image_dim=8, lm_dim=8, num_image_tokens=4, width=30, heads=4)
    with pytest.raises(ValueError, match="unknown connector.type"):
        build_connector(ConnectorConfig(type="resampler"), 8, 4, 8, 1.0)


def test_position_matters_and_token_count_is_checked():
    torch.manual_seed(0)
    q = QFormerConnector(image_dim=16, lm_dim=8, num_image_tokens=9, num_queries=4, depth=1, width=16, heads=2)
    image = torch.randn(1, 9, 16)
    moved = image[:, torch.roll(torch.arange(9), 1)]  # the same tokens, at other grid positions
    assert not torch.allclose(q(image), q(moved), atol=1e-6)
    with pytest.raises(ValueError, match="expected 9 image tokens"):
        q(torch.randn(1, 10, 16))


@pytest.mark.parametrize("kind, tokens", [("qformer", 4), ("meanpool", 4), ("linear", 9), ("mlp", 9)])
def test_every_connector_type_makes_visual_tokens_at_word_scale(kind, tokens):
    torch.manual_seed(0)
    cfg = ConnectorConfig(type=kind, num_queries=4, width=32, heads=2, depth=1)
    connector = build_connector(cfg, image_dim=40, num_image_tokens=9, lm_dim=24, lm_embedding_rms=0.2)
    image = torch.rand(3, 9, 40) * 6
    visual = connector(image)
    assert visual.shape == (3, tokens, 24) and connector.num_visual_tokens == tokens
    assert 0.2 / 1.5 < visual.pow(2).mean().sqrt().item() < 0.2 * 1.5
    assert not torch.allclose(visual[0], visual[1])  # other image, other tokens


def test_parameter_counts_follow_the_design():
    """Per-token linear: LayerNorm + one D->L map; meanpool's last layer makes Q tokens at once."""
    linear = build_connector(ConnectorConfig(type="linear"), 40, 9, 24, 1.0)
    assert sum(p.numel() for p in linear.parameters()) == 2 * 40 + 40 * 24 + 24
    mlp = build_connector(ConnectorConfig(type="mlp"), 40, 9, 24, 1.0)
    assert sum(p.numel() for p in mlp.parameters()) == 2 * 40 + (40 * 24 + 24) + 2 * 24 + (24 * 24 + 24)
    pool = build_connector(ConnectorConfig(type="meanpool", num_queries=4, width=32), 40, 9, 24, 1.0)
    assert sum(p.numel() for p in pool.parameters()) == 2 * 40 + (40 * 32 + 32) + 2 * 32 + (32 * 4 * 24 + 4 * 24)


def test_meanpool_cannot_see_where_things_are_but_per_token_can():
    torch.manual_seed(0)
    image = torch.randn(1, 9, 16)
    moved = image[:, torch.roll(torch.arange(9), 1)]
    pool = build_connector(ConnectorConfig(type="meanpool", num_queries=2, width=16), 16, 9, 8, 1.0)
    mlp = build_connector(ConnectorConfig(type="mlp"), 16, 9, 8, 1.0)
    assert torch.allclose(pool(image), pool(moved), atol=1e-6)
    assert not torch.allclose(mlp(image), mlp(moved))
    with pytest.raises(ValueError, match="expected 9 image tokens"):
        mlp(torch.randn(1, 10, 16))


def test_merge_grid_regroups_each_block_without_losing_a_vector():
    """4x4 grid, k=2: token j of the output is block j's four vectors side by side, row-major inside."""
    image = torch.arange(2 * 16 * 3, dtype=torch.float32).view(2, 16, 3)
    merged = merge_grid(image, (4, 4), 2)
    assert merged.shape == (2, 4, 12)
    grid = image.view(2, 4, 4, 3)
    top_right = torch.cat([grid[:, 0, 2], grid[:, 0, 3], grid[:, 1, 2], grid[:, 1, 3]], dim=-1)
    assert torch.equal(merged[:, 1], top_right)
    assert torch.equal(merged.flatten().sort().values, image.flatten().sort().values)  # every value, once
    with pytest.raises(ValueError, match="divisible by 2"):
        merge_grid(torch.randn(1, 49, 3), (7, 7), 2)


def test_merged_mlp_makes_a_quarter_of_the_tokens_each_from_its_own_block():
    torch.manual_seed(0)
    cfg = ConnectorConfig(type="mlp", merge=2)
    mlp = build_connector(cfg, image_dim=8, num_image_tokens=16, lm_dim=6, lm_embedding_rms=0.2, grid=(4, 4))
    assert mlp.num_visual_tokens == 4
    image = torch.randn(1, 16, 8)
    visual = mlp(image)
    assert visual.shape == (1, 4, 6) and 0.2 / 1.5 < visual.pow(2).mean().sqrt().item() < 0.2 * 1.5
    changed = image.clone()
    changed[0, 15] += 1.0  # the bottom-right grid cell: only the last block's token may move
    moved = (mlp(changed) - visual).abs().sum(dim=-1)[0]
    assert moved[3] > 0 and torch.all(moved[:3] == 0)
    swapped = image.view(1, 4, 4, 8)[:, :, [1, 0, 2, 3]].reshape(1, 16, 8)  # two cells inside block 0 and block 2
    assert not torch.allclose(mlp(swapped)[0, 0], visual[0, 0])  # where a vector sits in its block still counts
    with pytest.raises(ValueError, match="divisible by 2"):
        build_connector(cfg, image_dim=8, num_image_tokens=49, lm_dim=6, lm_embedding_rms=1.0, grid=(7, 7))
    with pytest.raises(ValueError, match="expected 16 image tokens"):
        mlp(torch.randn(1, 4, 8))
