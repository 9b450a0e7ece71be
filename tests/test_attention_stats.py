"""The attention statistics: uniform attention reads as uniform, identical queries as correlated."""

import math

import torch

from vlmlab.eval.attention_stats import attention_stats
from vlmlab.model.qformer import QFormerConnector


def connector(seed=0):
    torch.manual_seed(seed)
    return QFormerConnector(32, 64, 16, num_queries=4, depth=2, width=64, heads=4)


def test_uniform_attention_is_reported_as_uniform():
    c = connector()
    with torch.no_grad():  # query and key projections at zero: every score equal, every map uniform
        c.layers[-1].cross_attn.in_proj_weight[:128].zero_()
        c.layers[-1].cross_attn.in_proj_bias[:128].zero_()
    stats = attention_stats(type("M", (), {"connector": c})(), torch.randn(5, 16, 32))
    assert stats["attn_entropy_uniform"] == math.log(16)
    assert abs(stats["attn_entropy"] - math.log(16)) < 1e-5
    assert abs(stats["attn_max_weight"] - 1 / 16) < 1e-6


def test_selective_and_alike_queries_are_told_apart():
    c = connector()
    model = type("M", (), {"connector": c})()
    image = torch.randn(5, 16, 32) * 3
    with torch.no_grad():
        c.layers[-1].cross_attn.in_proj_weight[:128] *= 20  # sharp attention
    sharp = attention_stats(model, image)
    assert sharp["attn_entropy"] < 0.8 * sharp["attn_entropy_uniform"] and sharp["attn_max_weight"] > 2 / 16
    assert sharp["attn_query_correlation"] < 0.99
    with torch.no_grad():  # every query the same vector, and no self-attention mixing them apart: identical maps
        c.queries[:] = c.queries[:, :1]
    alike = attention_stats(model, image)
    assert alike["attn_query_correlation"] > 0.999


class FixedMaps(torch.nn.Module):
    """A connector whose last-layer maps are given: [B, Q, N] per batch."""

    def __init__(self, maps):
        super().__init__()
        self.maps = maps
        self.queries = torch.nn.Parameter(torch.zeros(1, maps.shape[1], 4))
        self.num_queries = maps.shape[1]

    def forward(self, image_tokens, return_attention=False):
        return None, [self.maps[: len(image_tokens)]]


def test_object_statistics_tell_queries_that_share_one_object_from_queries_that_divide_the_objects():
    from vlmlab.eval.attention_stats import object_cells

    grid = (4, 4)
    left, right = [0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]  # the top-left and bottom-right quarters
    cells_left, cells_right = object_cells(left, grid), object_cells(right, grid)
    assert cells_left.sum() == 4 and cells_right.sum() == 4 and not (cells_left & cells_right).any()
    assert object_cells([0.30, 0.30, 0.32, 0.32], grid).sum() == 1  # smaller than a cell: the cell of its centre

    def on(cells):
        return cells.float() / cells.sum()

    divided = torch.stack([on(cells_left), on(cells_right)])[None]  # query 0 reads one object, query 1 the other
    alike = torch.stack([on(cells_left), on(cells_left)])[None]
    background = torch.stack([on(~(cells_left | cells_right))] * 2)[None]
    tokens = torch.zeros(1, 16, 8)
    stats = {
        name: attention_stats(type("M", (), {"connector": FixedMaps(maps)})(), tokens, boxes=[[left, right]], grid=grid)
        for name, maps in (("divided", divided), ("alike", alike), ("background", background))
    }
    assert stats["divided"]["attn_objects_covered"] == 1.0
    assert stats["alike"]["attn_objects_covered"] == 0.5 == stats["alike"]["attn_objects_covered_alike"]
    assert abs(stats["divided"]["attn_object_mass"] - 1.0) < 1e-6 and stats["background"]["attn_object_mass"] < 1e-6
    assert stats["divided"]["attn_object_mass_uniform"] == 0.5
    one_object = attention_stats(type("M", (), {"connector": FixedMaps(alike)})(), tokens, boxes=[[left]], grid=grid)
    assert "attn_objects_covered" not in one_object  # no scene with two objects: nothing to divide
    assert "attn_object_mass" not in attention_stats(type("M", (), {"connector": FixedMaps(alike)})(), tokens)
