"""The package layout is the architecture: imports only point down the model path, and reading a finished
run does not need the trainer."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vlmlab"

# What each subpackage may import from vlmlab (besides itself and config). eval.probes is the one thing
# training shares with evaluation: the validation NLL it logs is the NLL probe `vlmlab eval` reports.
ALLOWED = {
    "data": set(),
    "model": {"data"},
    "train": {"data", "model", "eval.probes"},
    "eval": {"data", "model", "train"},
    "analysis": {"data", "model", "train", "eval"},
    "app": {"data", "model", "train", "eval", "analysis"},
    "integrations": {"data", "model", "train", "eval", "analysis", "app"},
}


def vlmlab_imports(path: Path) -> set[str]:
    """Every vlmlab module a file imports, lazy imports inside functions included, as dotted names."""
    package = path.relative_to(SRC.parent).with_suffix("").parts[:-1]  # e.g. ('vlmlab', 'model')
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


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down_the_layers(package):
    bad = []
    for path in sorted((SRC / package).rglob("*.py")):
        for module in vlmlab_imports(path):
            target = module.removeprefix("vlmlab.")
            top = target.split(".")[0]
            if top in (package, "config") or top not in ALLOWED and top != "cli":
                continue
            if not any(target == a or target.startswith(a + ".") for a in ALLOWED[package]):
                bad.append(f"{path.relative_to(SRC)} imports {module}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_the_layer_check_sees_lazy_and_relative_imports(tmp_path):
    probe = SRC / "model" / "vlm.py"
    imports = vlmlab_imports(probe)
    assert "vlmlab.data.formats" in imports  # `from ..data.formats import load_image`, inside a method


@pytest.mark.slow
def test_loading_a_run_needs_no_training_code(tmp_path, tiny_clip_dir, tiny_gpt2_dir):
    """A finished run captions without importing vlmlab's training loop (train.loop: the optimiser, the
    schedule, the Accelerator set-up). accelerate itself still arrives, but through transformers: its
    `from_pretrained` imports `accelerate` whenever it is installed (transformers/integrations/accelerate.py,
    checked below), so no code of ours can keep it out."""
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
        "import sys\nfrom vlmlab.train import load_run\n"
        "m = load_run(sys.argv[1]); print(repr(m.caption([sys.argv[2]], max_new_tokens=3)[0]))\n"
        "print('VLMLAB', sorted(n for n in sys.modules if n.startswith('vlmlab.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(run), str(image)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    loaded = out.stdout.split("VLMLAB ")[1]
    assert "vlmlab.train.checkpoint" in loaded and "vlmlab.model.vlm" in loaded
    assert "vlmlab.train.loop" not in loaded and "vlmlab.eval" not in loaded and "vlmlab.analysis" not in loaded
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
