"""Chat formats: how a conversation is written out as text for one LLM, as small prompt builders.

A builder turns `[{"role": "user"|"assistant", "content": ...}]` into pieces: text that is only read,
text that is supervised (assistant replies and the token that ends them), and the place of the image.
Which pieces are supervised is decided here, by construction; `conversation.py` turns the pieces into
token ids and labels by their lengths, never by searching the ids for special tokens.

- `chatml`: SmolLM2's own template, `<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n...<|im_end|>`
  (without the default system turn its template adds: a VLM needs none).
- `plain`: LLaVA's stage-1 format: the image, then the assistant's text and the end token; user text is
  dropped (in LLaVA's caption alignment it is only the `<image>` placeholder).
- `gpt2`: a plain-text dialogue for base models without a chat template: `User: ...\\nAssistant: ...<|endoftext|>`.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE = "<image>"
CHAT_FORMATS = ("chatml", "plain", "gpt2")


@dataclass
class Piece:
    text: str  # "" for the image slot
    supervised: bool = False
    image: bool = False
    end: bool = False  # the end token of an assistant turn (emitted as an id, whatever its text)


def _check(messages: list[dict]) -> None:
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or m.get("role") not in ("user", "assistant")
            or not isinstance(m.get("content"), str)
        ):
            raise ValueError(f"message {i}: expected {{'role': 'user'|'assistant', 'content': str}}, got {m!r}")
    if messages[0]["role"] != "user":
        raise ValueError("a conversation starts with a user message")
    count = sum(m["content"].count(IMAGE) for m in messages)
    if count > 1:
        raise ValueError(f"{count} {IMAGE} placeholders: one image per conversation")


def _user_text(content: str, with_image: bool) -> list[Piece]:
    """User text with the image slot where the placeholder was (or first, when `with_image` and none)."""
    if IMAGE in content:
        before, after = content.split(IMAGE, 1)
        return [Piece(before.rstrip(" ")), Piece("", image=True), Piece(after.lstrip(" ").lstrip("\n"))]
    return ([Piece("", image=True)] if with_image else []) + [Piece(content)]


def build_pieces(fmt: str, messages: list[dict], generation: bool, image: bool = True) -> list[Piece]:
    """The pieces of a conversation; with `generation`, it ends where the next assistant reply begins."""
    _check(messages)
    placeholder = any(IMAGE in m["content"] for m in messages)
    pieces: list[Piece] = []
    for i, m in enumerate(messages):
        first_user = i == 0
        content = m["content"] if image else m["content"].replace(IMAGE, "")
        slot = image and first_user and not placeholder
        if fmt == "chatml":
            if m["role"] == "user":
                pieces += [Piece("<|im_start|>user\n"), *_user_text(content, slot), Piece("<|im_end|>\n")]
            else:
                pieces += [Piece("<|im_start|>assistant\n"), Piece(content.strip(), supervised=True)]
                pieces += [Piece("", supervised=True, end=True), Piece("\n")]
        elif fmt == "gpt2":
            if m["role"] == "user":
                pieces += [Piece("User: "), *_user_text(content, slot), Piece("\n")]
            else:
                pieces += [Piece("Assistant:"), Piece(" " + content.strip(), supervised=True)]
                pieces += [Piece("", supervised=True, end=True), Piece("\n")]
        elif fmt == "plain":
            if m["role"] == "user":
                pieces += [Piece("", image=True)] if image and (slot or IMAGE in m["content"]) else []
            else:
                pieces += [Piece(content.strip(), supervised=True), Piece("", supervised=True, end=True)]
        else:
            raise ValueError(f"unknown chat format {fmt!r}; allowed: {list(CHAT_FORMATS)}")
    if generation:
        if messages[-1]["role"] != "user":
            raise ValueError("to generate a reply, the conversation must end with a user message")
        pieces.append(Piece({"chatml": "<|im_start|>assistant\n", "gpt2": "Assistant:", "plain": ""}[fmt]))
    return [p for p in pieces if p.text or p.image or p.end]


def end_token_for(fmt: str, default_end: str) -> str:
    """The token that ends an assistant turn: <|im_end|> in chatml, the run's end token otherwise."""
    return "<|im_end|>" if fmt == "chatml" else default_end


def resolve_format(name: str, vocab: dict[str, int]) -> str:
    """`auto`: chatml when the vocabulary (tokenizer.get_vocab()) has <|im_start|> and <|im_end|> (SmolLM2), else gpt2."""
    if name != "auto":
        if name not in CHAT_FORMATS:
            raise ValueError(f"unknown chat format {name!r}; allowed: auto, {', '.join(CHAT_FORMATS)}")
        return name
    return "chatml" if "<|im_start|>" in vocab and "<|im_end|>" in vocab else "gpt2"
