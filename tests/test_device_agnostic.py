"""The model and training code run on whatever device accelerate gives them (no GPU is lent to CI, so this is
checked in the source): no tensor is sent to the host, or to a named device, inside the model and training
paths, except where a result leaves the model on purpose (saved weights, a returned score, a fingerprint);
autocast is never pinned to the CPU there."""

import ast
from pathlib import Path

import vlmlab

SRC = Path(vlmlab.__file__).parent
HOT = [*sorted((SRC / "model").glob("*.py")), SRC / "train" / "loop.py", SRC / "train" / "stage1_loop.py"]
# function -> why a tensor leaves the device there
TO_HOST = {
    "trainable_state_dict": "saved weights are written from the host",
    "reply_logprobs": "the scores it returns",
    "tensor_digest": "a hash of the encoder's weights (the feature cache key)",
}


def host_transfers(path: Path) -> list[tuple[str, int, str]]:
    """(function, line, what) for each .cpu() / .cuda() / .to('cpu') / autocast('cpu') / device='cpu' in path."""
    found = []
    for fn in ast.walk(ast.parse(path.read_text())):
        if not isinstance(fn, ast.FunctionDef):
            continue
        for node in ast.walk(fn):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            literal_cpu = any(isinstance(a, ast.Constant) and a.value in ("cpu", "cuda") for a in node.args) or any(
                k.arg == "device" and isinstance(k.value, ast.Constant) and k.value.value in ("cpu", "cuda")
                for k in node.keywords
            )
            if name in ("cpu", "cuda") or (name in ("to", "autocast") and literal_cpu) or literal_cpu:
                found.append((fn.name, node.lineno, ast.unparse(node)[:80]))
    return found


def test_no_hot_path_pins_a_device():
    pinned = [
        f"{path.relative_to(SRC)}:{line} in {fn}(): {code}"
        for path in HOT
        for fn, line, code in host_transfers(path)
        if fn not in TO_HOST and "map_location" not in code
    ]
    assert not pinned, "tensors pinned to a device in the model / training paths:\n" + "\n".join(pinned)


def test_the_check_sees_each_way_of_pinning(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text(
        "def forward(x):\n"
        "    a = x.cpu()\n"
        "    b = x.to('cpu')\n"
        "    with torch.autocast('cpu'):\n"
        "        c = torch.zeros(1, device='cuda')\n"
        "    return x.to(x.device)\n"
    )
    assert [line for _, line, _ in host_transfers(planted)] == [2, 3, 4, 5]
