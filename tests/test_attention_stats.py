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
