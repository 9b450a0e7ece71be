"""A vlmlab run as a VLMEvalKit model.

VLMEvalKit is not on PyPI: clone it, then add to its `vlmeval/config.py`

    from functools import partial
    from vlmlab.integrations.vlmevalkit import VlmlabVLMEvalKit
    supported_VLM["vlmlab"] = partial(VlmlabVLMEvalKit, run="runs/chain/photos/vqa")

and run `python run.py --data MMBench_DEV_EN POPE --model vlmlab`. VLMEvalKit calls
`generate_inner(message, dataset)` with a message that is a list of `{"type": "image" | "text", "value": ...}`
items; a vlmlab model reads one image, placed where it comes among the text items.
"""

from __future__ import annotations


def to_messages(message: list[dict]) -> tuple[str | None, list[dict]]:
    """VLMEvalKit's interleaved items -> (the image path, one user turn with `<image>` where the image was)."""
    if isinstance(message, str):
        return None, [{"role": "user", "content": message}]
    image, parts = None, []
    for i, item in enumerate(message):
        kind, value = item.get("type"), item.get("value")
        if kind == "image":
            if image is not None:
                raise ValueError(f"item {i}: a second image; a vlmlab model reads one image per question")
            image = value
            parts.append("<image>")
        elif kind == "text":
            parts.append(str(value))
        else:
            raise ValueError(f"item {i}: type {kind!r}; VLMEvalKit messages hold 'image' and 'text' items")
    content = "\n".join(p for p in parts if p)
    return image, [{"role": "user", "content": content}]


class VlmlabVLMEvalKit:
    """The interface VLMEvalKit's BaseModel subclasses expose: generate(message, dataset) -> str."""

    INSTALL_REQ = False
    INTERLEAVE = False  # one image per question

    def __init__(self, run: str, max_new_tokens: int = 32, **kwargs):
        from ..run import load_run

        self.model = load_run(run)
        self.max_new_tokens = max_new_tokens

    def generate_inner(self, message, dataset=None) -> str:
        image, messages = to_messages(message)
        return self.model.chat(image, messages, max_new_tokens=self.max_new_tokens)

    def generate(self, message, dataset=None) -> str:
        return self.generate_inner(message, dataset)
