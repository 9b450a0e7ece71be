"""Every shipped recipe (recipes/) and every record (docs/experiments/) loads, each stage and variant valid;
recipes/demo.yaml is exactly the dataclass defaults; a chain comes from at most one other; overrides are written
one way; data is found through one root, $VLMLAB_DATA."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from vlmlab.analysis.ablate import load_suite
from vlmlab.analysis.chain import Chain, load_chain
from vlmlab.analysis.recipes import RECIPE_DIR, recipe_names
from vlmlab.config import Config, ConfigError, apply_settings, config_to_dict, load_config, validate

REPO = Path(__file__).resolve().parents[1]
CONFIGS = recipe_names("config")
CHAINS = recipe_names("chain")
SUITES = recipe_names("suite")
RECORDS = sorted((REPO / "docs" / "experiments").glob("*.md"))


@pytest.fixture(autouse=True)
def data_root(tmp_path, monkeypatch):
    """Recipes name their data under $VLMLAB_DATA, which must be a folder: any will do to load them."""
    monkeypatch.setenv("VLMLAB_DATA", str(tmp_path))
    return tmp_path


def chain_configs(chain: Chain) -> dict[str, dict]:
    """Every run's config of a chain, as `vlmlab chain` trains them: 'model/<stage>' and 'blind/<stage>'."""
    out, runs, configs = Path("runs/check"), {}, {}
    for arm in ("model", "blind") if chain.blind else ("model",):
        previous, stages = (None if chain.pretrained is None else Path(chain.pretrained)), list(chain.stages)
        if arm == "blind" and chain.blind_from:
            previous, stages = runs[chain.blind_from], stages[stages.index(chain.blind_from) + 1 :]
        for stage in stages:
            run_dir = out / stage if arm == "model" else out / "blind" / stage
            configs[f"{arm}/{stage}"] = config_to_dict(chain.config(stage, run_dir, previous, blind=arm == "blind"))
            if arm == "model":
                runs[stage] = run_dir
            previous = run_dir
    return configs


def test_the_recipes_are_the_few_files_a_user_runs():
    assert CONFIGS == ["demo", "hub-gpu", "photo-captions", "photos-mini"]
    assert CHAINS == ["photos-hour", "synthetic"]
    assert SUITES == ["photos-16-tokens", "qformer-stages-multi", "qformer-stages", "roles-multi", "roles"]
    assert len(list(RECIPE_DIR.glob("*"))) == len(CONFIGS + CHAINS + SUITES)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_recipe_loads_and_validates(name):
    validate(load_config(RECIPE_DIR / f"{name}.yaml"))


@pytest.mark.parametrize("name", CHAINS)
def test_every_chain_recipe_loads_flat_with_every_run_valid(name):
    chain = load_chain(name)
    assert "from" not in yaml.safe_load(chain.path.read_text()), "a recipe is flat: every key in its own file"
    assert (list(chain.stages)[0] == "caption" or chain.pretrained) and chain.tasks
    assert len(chain_configs(chain)) >= len(chain.stages)


@pytest.mark.parametrize("name", SUITES)
def test_every_suite_recipe_loads_with_every_variant_valid(name):
    suite = load_suite(name)
    assert suite.variants
    for variant in suite.variants:
        for seed in suite.seeds:
            validate(suite.config(variant, seed, out_dir=Path("runs/check")))


def test_no_recipe_names_a_data_folder_outside_the_data_root():
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        assert "../shared" not in path.read_text(), f"{path.name}: name data as $VLMLAB_DATA/..."


# config keys added after the photos-hour runs were made, at their defaults: xattn is another connector type (its
# gates have their own lr), the occlusion flag draws only synthetic worlds
ADDED_SINCE = {"connector": {"xattn_every": 6}, "data": {"synthetic_occlusion": False}, "train": {"gate_lr": 0.01}}


def test_photos_hour_resolves_to_the_runs_it_trained_before_it_was_written_flat(data_root):
    """tests/fixtures/photos_hour_bf16_resolved.json: the chain's keys and every run's config, resolved by the
    six-level `from` chain it was (photos-hour-stage1-1600 <- photos-hour <- ... <- photos-recipe-boxes).
    Its one change since: `mixed_precision: bf16` became `auto`, which is bf16 on the AVX512-BF16 CPU the record
    was measured on and float32 where bf16 would be emulated (train/precision.py). Keys added to the config
    since then enter at their defaults, which change nothing in these runs (ADDED_SINCE)."""
    before = (Path(__file__).parent / "fixtures" / "photos_hour_bf16_resolved.json").read_text()
    before = before.replace("../shared/data", str(data_root))
    before = json.loads(before.replace('"mixed_precision": "bf16"', '"mixed_precision": "auto"'))
    for run in before["configs"].values():
        for section, keys in ADDED_SINCE.items():
            assert not set(keys) & set(run[section])
            run[section].update(keys)
    chain = load_chain("photos-hour")
    assert {k: getattr(chain, k) for k in before["chain"]} == before["chain"]
    assert chain_configs(chain) == before["configs"]


def _chain_file(tmp_path: Path, name: str, tree: dict) -> str:
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(tree))
    return str(tmp_path / f"{name}.yaml")


def test_a_chain_comes_from_at_most_one_other_and_the_error_names_both_files(tmp_path):
    parent = _chain_file(tmp_path, "parent", {"from": "photos-hour", "vqa_turns": 2})
    child = _chain_file(tmp_path, "child", {"from": "parent.yaml", "blind": False})
    assert load_chain(parent).vqa_turns == 2  # one level is fine
    with pytest.raises(ConfigError, match="child.yaml: from: .*parent.yaml comes from 'photos-hour' in turn"):
        load_chain(child)


def test_overrides_are_dotted_keys_in_a_mapping_and_the_other_forms_are_refused(tmp_path):
    stages = {"caption": {}}
    ok = _chain_file(tmp_path, "ok", {"overrides": {"train.max_steps": 7}, "stages": stages})
    assert load_chain(ok).config("caption", tmp_path, None, blind=False).train.max_steps == 7
    listed = _chain_file(tmp_path, "listed", {"overrides": ["train.max_steps=7"], "stages": stages})
    with pytest.raises(ConfigError, match="listed.yaml: overrides map dotted keys to values"):
        load_chain(listed)
    nested = _chain_file(tmp_path, "nested", {"overrides": {"train": {"max_steps": 7}}, "stages": stages})
    with pytest.raises(ConfigError, match="train: write one dotted key per setting"):
        load_chain(nested)
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({"overrides": ["train.max_steps=7"], "variants": {"a": {}}}))
    with pytest.raises(ConfigError, match="suite.yaml: overrides map dotted keys to values"):
        load_suite(str(tmp_path / "suite.yaml"))
    with pytest.raises(ConfigError, match="one dotted key"):
        apply_settings(Config(), {"lm": {"lora": {"r": 4}}})


def test_the_data_root_is_vlmlab_data_else_the_shared_folder_and_a_missing_root_fails_naming_it(tmp_path, monkeypatch):
    spec = "coco:$VLMLAB_DATA/coco2017-val"
    assert load_config(None, [f"data.datasets=[{spec}]"]).data.datasets == [f"coco:{tmp_path}/coco2017-val"]
    monkeypatch.delenv("VLMLAB_DATA")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")  # the default: ../shared/data from where vlmlab runs
    assert apply_settings(Config(), {"data.datasets": [spec]}).data.datasets == ["coco:../shared/data/coco2017-val"]
    monkeypatch.setenv("VLMLAB_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"data.datasets=[{spec}]"])
    assert "nowhere" in str(e.value) and "set VLMLAB_DATA" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv("VLMLAB_DATA", str(tmp_path))
    chain = _chain_file(
        tmp_path, "q", {"stages": {"caption": {}}, "questions": [{"task": "vqa", "file": "$VLMLAB_DATA/q"}]}
    )
    assert load_chain(chain).questions == [{"task": "vqa", "file": f"{tmp_path}/q"}]


def _keys(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in tree.items():
        out |= _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


def test_demo_yaml_lists_every_key_with_the_dataclass_default():
    written = yaml.safe_load((RECIPE_DIR / "demo.yaml").read_text())
    defaults = config_to_dict(Config())
    assert _keys(written) == _keys(defaults), "recipes/demo.yaml must list every key, and only those"
    assert load_config(RECIPE_DIR / "demo.yaml") == Config()
    assert dataclasses.asdict(load_config(None)) == defaults


def _record_blocks() -> list[tuple[str, str]]:
    """Every ```yaml block of the records, as (record:name, text)."""
    blocks = []
    for path in RECORDS:
        for text in re.findall(r"```yaml\n(.*?)```", path.read_text(), flags=re.S):
            blocks.append((f"{path.stem}:{yaml.safe_load(text).get('name', '?')}", text))
    return blocks


def test_there_are_records():
    assert len(RECORDS) >= 3 and len(_record_blocks()) >= 10


@pytest.mark.parametrize("label,text", _record_blocks(), ids=[label for label, _ in _record_blocks()])
def test_every_record_is_a_flat_file_that_runs(label, text, tmp_path):
    """A record's block, copied into a file, is what `vlmlab chain` / `ablate` / `train` reads."""
    tree = yaml.safe_load(text)
    assert "from" not in tree and "../shared" not in text, f"{label}: a record is flat and names $VLMLAB_DATA"
    path = tmp_path / "record.yaml"
    path.write_text(text)
    if "stages" in tree:
        assert chain_configs(load_chain(str(path)))
    elif "variants" in tree:
        suite = load_suite(str(path))
        for variant in suite.variants:
            validate(suite.config(variant, suite.seeds[0], out_dir=Path("runs/check")))
    else:
        validate(load_config(path))
