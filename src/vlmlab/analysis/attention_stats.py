"""The contract's name (CONTRACTS.md) for the Q-Former attention statistics. They live in eval/attention_stats.py
because `vlmlab eval` shows them and eval may not import analysis (tests/test_layout.py)."""

from ..eval.attention_stats import attention_stats

__all__ = ["attention_stats"]
