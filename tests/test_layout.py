"""The package layout is the architecture: imports only point down the model path, and reading a finished
run does not need the trainer."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vlmlab"

# The layers, bottom up: config < data < model < run < train < eval < analysis < app < integrations (cli.py, the
# command line, sits on top of all of them and is not checked). Each may import config and the layers listed
# for it. Reading a run goes through `run`, so eval, app and integrations never import `train`: they score, show
# and serve runs that training made; `analysis` orchestrates (ablations, chains) and trains.
ALLOWED = {
    "config": set(),  # plain data: it imports nothing of the package, not even lazily
    "data": set(),
    "model": {"data"},
    "run": {"data", "model"},
    "train": {"data", "model", "run"},
    "eval": {"data", "model", "run"},
    "analysis": {"data", "model", "run", "train", "eval"},
    "app": {"data", "model", "run", "eval", "analysis"},
    "integrations": {"data", "model", "run", "eval", "analysis", "app"},
}


def vlmlab_imports(path: Path, src: Path = SRC) -> set[str]:
    """Every vlmlab module a file imports, lazy imports inside functions included, as dotted names."""
    package = path.relative_to(src.parent).with_suffix("").parts[:-1]  # e.g. ('vlmlab', 'model')
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [f"{module}.{a.name}" for a in node.names] if not node.module or node.level else [module]
            out |= {n for n in [module, *names] if n.startswith("vlmlab.")}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("vlmlab.")}
    return out


def layer_files(layer: str, src: Path = SRC) -> list[Path]:
    return [src / "config.py"] if layer == "config" else sorted((src / layer).rglob("*.py"))


def upward_imports(layer: str, src: Path = SRC, allowed: dict = ALLOWED) -> list[str]:
    """'FILE imports MODULE' for each import of a layer's files that the order above does not allow."""
    bad = []
    for path in layer_files(layer, src):
        for module in vlmlab_imports(path, src):
            target = module.removeprefix("vlmlab.")
            top = target.split(".")[0]
            if top == layer or (top == "config" and layer != "config"):
                continue
            file = path.relative_to(src).as_posix()
            if top in allowed[layer]:
                continue
            bad.append(f"{file} imports {module}")
    return sorted(bad)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_point_down_the_layers(layer):
    bad = upward_imports(layer)
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_every_part_of_the_package_has_a_layer():
    parts = {p.stem for p in SRC.iterdir() if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
    assert parts - {"__init__", "cli"} == set(ALLOWED)


def test_the_layer_check_sees_lazy_and_relative_imports():
    probe = SRC / "model" / "vlm.py"
    imports = vlmlab_imports(probe)
    assert "vlmlab.data.formats" in imports  # `from ..data.formats import load_image`, inside a method


def test_the_layer_check_fails_on_planted_violations(tmp_path):
    """A copy of the layout with upward imports planted: lazy, relative, absolute, and in config.py."""
    src = tmp_path / "vlmlab"
    files = {
        "config.py": "def f():\n    from .data import formats\n",
        "model/__init__.py": "",
        "model/fine.py": "from ..config import Config\nfrom ..data.pairs import SplitFeatures\n",
        "model/lazy.py": "def f():\n    from ..train.loop import train\n",
        "eval/__init__.py": "",
        "eval/absolute.py": "import vlmlab.train.stages\n",
        "eval/through_run.py": "from ..run import load_run\n",
        "app/__init__.py": "",
        "app/upward.py": "from vlmlab.integrations import vlmevalkit\n",
    }
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    found = {layer: upward_imports(layer, src) for layer in ("config", "model", "eval", "app")}
    assert found == {
        "config": ["config.py imports vlmlab.data", "config.py imports vlmlab.data.formats"],
        "model": ["model/lazy.py imports vlmlab.train.loop", "model/lazy.py imports vlmlab.train.loop.train"],
        "eval": ["eval/absolute.py imports vlmlab.train.stages"],
        "app": ["app/upward.py imports vlmlab.integrations"],
    }


@pytest.mark.slow
def test_loading_a_run_needs_no_training_code(tmp_path, tiny_clip_dir, tiny_gpt2_dir):
    """A finished run captions through `vlmlab.run` without importing any of `vlmlab.train` (the loop, the
    optimiser, the schedule, the Accelerator set-up, the stages), nor eval, analysis or the app. accelerate
    itself still arrives, but through transformers: its `from_pretrained` imports `accelerate` whenever it is
    installed (transformers/integrations/accelerate.py, checked below), so no code of ours can keep it out."""
    from vlmlab.config import load_config
    from vlmlab.train.loop import train

    cfg = load_config(
        None,
        [
            f"vision.name=hf:{tiny_clip_dir}",
            f"lm.name={tiny_gpt2_dir}",
            "data.datasets=[synthetic:" + str(tmp_path / "world") + "]",
            "data.synthetic_images=40",
            "train.max_steps=2",
            "train.batch_size=4",
            "train.eval_every=2",
            "train.save_every=2",
            f"train.output_dir={tmp_path / 'run'}",
        ],
    )
    run = train(cfg)
    image = next((tmp_path / "world").rglob("*.png"))
    script = (
        "import sys\nfrom vlmlab.run import load_run\n"
        "m = load_run(sys.argv[1]); print(repr(m.caption([sys.argv[2]], max_new_tokens=3)[0]))\n"
        "print('VLMLAB', sorted(n for n in sys.modules if n.startswith('vlmlab.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(run), str(image)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    loaded = ast.literal_eval(out.stdout.split("VLMLAB ")[1].strip())
    assert "vlmlab.run.checkpoint" in loaded and "vlmlab.model.vlm" in loaded
    layers = {name.split(".")[1] for name in loaded}
    assert not layers & {"train", "eval", "analysis", "app", "integrations"}, sorted(loaded)
    transformers_alone = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from transformers import AutoModelForCausalLM; "
            f"AutoModelForCausalLM.from_pretrained({str(tiny_gpt2_dir)!r}); print('accelerate' in sys.modules)",
        ],
        capture_output=True,
        text=True,
    )
    assert transformers_alone.stdout.strip().endswith("True")  # the evidence for the docstring
