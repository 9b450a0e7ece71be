"""Every shipped config and suite loads, and configs/default.yaml is exactly the dataclass defaults."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from vlmlab.analysis.ablate import SUITE_DIR, load_suite
from vlmlab.config import Config, config_to_dict, load_config, validate

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
SUITES = sorted(SUITE_DIR.glob("*.yaml"))


def test_there_are_configs_and_suites_to_check():
    assert any(p.name == "default.yaml" for p in CONFIGS) and SUITES


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    validate(load_config(path))


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.name)
def test_every_shipped_suite_loads_with_every_variant_valid(path):
    suite = load_suite(path)
    assert suite.variants
    for variant in suite.variants:
        for seed in suite.seeds:
            validate(suite.config(variant, seed, out_dir=Path("runs/check")))


def _keys(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in tree.items():
        out |= _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


def test_default_yaml_lists_every_key_with_the_dataclass_default():
    written = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    defaults = config_to_dict(Config())
    assert _keys(written) == _keys(defaults), "configs/default.yaml must list every key, and only those"
    assert load_config(REPO / "configs" / "default.yaml") == Config()
    assert dataclasses.asdict(load_config(None)) == defaults
