"""`vlmlab serve`: try a trained run in the browser (gradio).

One page: upload an image or pick one of the run's test images; see its caption beside the caption of
another image ("swapped image": if the two agree, the caption does not depend on the picture); for a
Q-Former run, the per-query cross-attention maps of `vlmlab inspect`; a multi-turn chat whose every reply
comes with the reply under the swapped image; and the run's card (config, parameter table, eval tables).

A bad upload (not an image, a decompression bomb, a 1x1 image) is a message in the page, never a stack
trace, and the server keeps serving; CMYK, 16-bit and transparent images are converted and captioned.

API (gradio_client): /caption(upload, swap_with), /chat(upload, history, question, swap_with),
/attention(upload), /pick(test_image), /card().

gradio is the optional `app` extra (see the Makefile: gradio itself is installed with --no-deps).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import traceback
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..run.release import is_release, read_card

MIN_IMAGE_SIDE = 8  # below this the encoder's resize invents the picture; a 1x1 "image" is an upload mistake
UPLOAD_HINT = "Upload an image (JPEG, PNG, WebP, ...) or pick one of the run's test images."
BAD_UPLOAD = "**Could not use this upload.**"
FAILED = "**The model failed on this request.**"


class BadUpload(ValueError):
    """An upload the app cannot use; the message is shown in the page as it is."""


def read_upload(path: str | Path) -> Image.Image:
    """An uploaded file -> an RGB image, or BadUpload with a message a user can act on."""
    from ..data.formats import ImageTooLarge, UnreadableImage, load_image

    name = Path(path).name
    try:
        image = load_image(path)
    except UnidentifiedImageError:
        raise BadUpload(f"`{name}` is not an image this app can read. {UPLOAD_HINT}") from None
    except ImageTooLarge as e:
        raise BadUpload(f"`{name}` is too large: {str(e).split(': ', 1)[-1]}.") from None
    except (UnreadableImage, OSError) as e:
        raise BadUpload(f"`{name}` could not be decoded ({str(e).split(': ', 1)[-1]}).") from None
    if min(image.size) < MIN_IMAGE_SIDE:
        raise BadUpload(
            f"`{name}` is {image.width}x{image.height} pixels: too small to show anything "
            f"(at least {MIN_IMAGE_SIDE} pixels a side)."
        )
    return image


def _failure(e: Exception) -> str:
    """A model error as one readable line in the page; the traceback goes to the server's console only."""
    traceback.print_exc()
    return f"{FAILED} {type(e).__name__}: {e}"


def test_images(cfg, load_samples) -> dict[str, str]:
    """The run's test images by name; none when its data is not on this machine (a zoo model served elsewhere):
    the page then swaps between uploads only."""
    from ..config import ConfigError
    from ..data.formats import InputError

    try:
        return {Path(s.image_path).name: s.image_path for s in load_samples(cfg)["test"]}
    except (FileNotFoundError, InputError, ConfigError) as e:
        print(f"vlmlab serve: no test images to pick from ({e}); upload images instead")
        return {}


class RunSession:
    """A loaded run and what the page asks of it. Model calls are serialised (one model, shared by all tabs)."""

    def __init__(self, run_dir: str | Path):
        from ..data.pairs import load_samples
        from ..run import load_run

        self.run_dir = Path(run_dir)
        self.model = load_run(self.run_dir)
        self.stage = self.model.cfg.train.stage
        self.test_images = test_images(self.model.cfg, load_samples)
        self.has_queries = hasattr(self.model.connector, "queries")  # a Q-Former, or xattn's resampler
        self._lock = threading.Lock()
        self._work = Path(tempfile.mkdtemp(prefix="vlmlab-serve-"))  # gradio serves files from the temp dir

    # ---- inputs ------------------------------------------------------------------------------
    def image_of(self, upload: str | None) -> tuple[Image.Image, str]:
        if not upload:
            raise BadUpload(f"No image yet. {UPLOAD_HINT}")
        return read_upload(upload), Path(upload).name

    def swap_for(self, name: str, swap_with: str | None) -> tuple[Image.Image, str]:
        """The other image: the one picked, else the first test image that is not this one."""
        if swap_with and swap_with not in self.test_images:
            raise BadUpload(f"`{swap_with}` is not one of this run's test images.")
        candidates = [swap_with] if swap_with else [n for n in self.test_images if n != name]
        if not candidates:
            raise BadUpload("this run has no other test image to swap in.")
        return read_upload(self.test_images[candidates[0]]), candidates[0]

    # ---- endpoints ---------------------------------------------------------------------------
    def pick(self, test_image: str | None):
        """/pick: a test image by name -> (it as the upload, its preview)."""
        if not test_image:
            return None, None
        if test_image not in self.test_images:
            raise _gradio_error(f"{test_image!r} is not one of this run's test images.")
        copy = self._work / "picked" / test_image  # a copy: gradio only hands out files under the temp dir
        copy.parent.mkdir(exist_ok=True)
        shutil.copyfile(self.test_images[test_image], copy)
        return str(copy), str(copy)

    def preview(self, upload: str | None):
        """The uploaded image as the model will see it (RGB), or why it cannot be used."""
        if not upload:
            return None, ""
        try:
            return self.image_of(upload)[0], ""
        except BadUpload as e:
            return None, f"{BAD_UPLOAD} {e}"

    def caption(self, upload: str | None, swap_with: str | None):
        """/caption -> (caption, caption under the swapped image, the swapped image, status message)."""
        try:
            image, name = self.image_of(upload)
            other, other_name = self.swap_for(name, swap_with)
        except BadUpload as e:
            return "", "", None, f"{BAD_UPLOAD} {e}"
        try:
            with self._lock:
                caption, swapped = self.model.caption([image, other])
        except Exception as e:  # noqa: BLE001 - shown in the page; the server keeps serving
            return "", "", None, _failure(e)
        same = ", the same caption: it does not follow the picture here" if swapped == caption else ""
        return caption, f"{swapped}  ({other_name}{same})", other, ""

    def attention(self, upload: str | None):
        """/attention -> (picture of the per-query cross-attention maps, status message)."""
        if not self.has_queries:
            return None, f"This run's connector (`{self.model.cfg.connector.type}`) has no queries to look at."
        try:
            image, name = self.image_of(upload)
        except BadUpload as e:
            return None, f"{BAD_UPLOAD} {e}"
        try:
            from ..analysis.inspect import draw_inspection, inspect_image

            path = self._work / f"{time.monotonic_ns()}.png"
            image.save(path)  # inspect_image reads a file; this one is the checked, RGB upload
            with self._lock:
                result = inspect_image(self.model, path)
            title = f"{name}: Q-Former cross-attention per query (last layer)"
            return str(draw_inspection(result, path.with_suffix(".attention.png"), title)), ""
        except Exception as e:  # noqa: BLE001
            return None, _failure(e)

    def chat(self, upload: str | None, history, question: str | None, swap_with: str | None, short: bool = False):
        """/chat: one turn -> (history with the reply, the reply under the swapped image, status, cleared box).
        short: the question asks for a word or number, as `vlmlab chat --short` and the VQA scores ask (the
        suffix stays in the history: the conversation shows what the model read)."""
        from ..data.grounded_questions import VQA_SUFFIX
        from ..model.chat_format import IMAGE

        history = [{"role": m["role"], "content": _text_of(m["content"])} for m in (history or [])]
        question = (question or "").replace(IMAGE, " ").strip()  # the image slot is ours to place
        if not question:
            return history, "", "Type a question first.", ""
        try:
            image, name = self.image_of(upload)
            other, other_name = self.swap_for(name, swap_with)
        except BadUpload as e:
            return history, "", f"{BAD_UPLOAD} {e}", question
        messages = history + [{"role": "user", "content": question + VQA_SUFFIX if short else question}]
        try:
            with self._lock:
                reply, swapped = self.model.chat_batch([image, other], [messages, messages])
        except Exception as e:  # noqa: BLE001
            return history, "", _failure(e), question
        swapped_note = f"With **{other_name}** instead, the reply would be: {swapped}"
        return messages + [{"role": "assistant", "content": reply}], swapped_note, "", ""

    def card(self) -> str:
        """/card: the run's card as Markdown: parameter table, every eval table the run has, config."""
        from ..model.vlm import format_parameter_table

        cfg = self.model.cfg
        parts = [
            f"### Run `{self.run_dir}`",
            f"stage `{self.stage}`, connector `{cfg.connector.type}`, language model `{cfg.lm.name}`, "
            f"vision `{cfg.vision.name}`; {self.model.num_visual_tokens} visual tokens per image; "
            f"{len(self.test_images)} test images.",
            "#### Parameters",
            "```\n" + format_parameter_table(self.model.parameter_table()) + "\n```",
        ]
        card = self.run_dir / "README.md"
        if card.exists() and is_release(self.run_dir):  # a released model: its card, figures from its records
            parts.append(read_card(card)[1])
        tables = sorted(self.run_dir.glob("eval*.md"))
        for table in tables:
            parts += [f"#### {table.name}", table.read_text()]
        if not tables and not card.exists():
            parts.append("*This run is not evaluated yet: `vlmlab eval RUN_DIR` writes eval.md.*")
        parts += ["#### config.yaml", "```yaml\n" + (self.run_dir / "config.yaml").read_text() + "\n```"]
        return "\n\n".join(parts)


def _text_of(content) -> str:
    """gradio 6 chat messages carry content as a string or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(_text_of(c) for c in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return str(content)


def _gradio_error(message: str):
    import gradio as gr

    return gr.Error(message)


def build_app(session: RunSession):
    """The gradio Blocks page; element ids (#upload, #caption-btn, ...) are what the browser test drives."""
    import gradio as gr

    names = list(session.test_images)
    chat_note = "" if session.stage == "instruct" else " (a caption run: it answers in its caption style)"
    with gr.Blocks(title=f"vlmlab: {session.run_dir.name}", analytics_enabled=False) as app:
        gr.Markdown(f"## vlmlab: `{session.run_dir}`\n{UPLOAD_HINT}")
        with gr.Row():
            with gr.Column():
                # a File, not an Image: gr.Image decodes the upload itself, and a bad one would be gradio's
                # error instead of ours (and a decompression bomb would be decoded before we could refuse it)
                upload = gr.File(label="upload an image", type="filepath", elem_id="upload")
                pick = gr.Dropdown(names, value=None, label="or one of the run's test images", elem_id="pick")
                swap_with = gr.Dropdown(
                    names, value=None, label="swapped image (default: another test image)", elem_id="swap-with"
                )
                with gr.Row():
                    caption_btn = gr.Button("Caption", variant="primary", elem_id="caption-btn")
                    attention_btn = gr.Button(
                        "Attention maps", elem_id="attention-btn", interactive=session.has_queries
                    )
                status = gr.Markdown(elem_id="status")
            preview = gr.Image(label="the image", type="pil", interactive=False, elem_id="preview")
            swapped_image = gr.Image(label="the swapped image", type="pil", interactive=False, elem_id="swapped-image")
        with gr.Row():
            caption = gr.Textbox(label="caption", elem_id="caption", interactive=False)
            swapped = gr.Textbox(label="caption with the swapped image", elem_id="swapped-caption", interactive=False)
        attention = gr.Image(
            label="Q-Former cross-attention per query", type="filepath", interactive=False, elem_id="attention"
        )

        gr.Markdown(f"### Chat about the image{chat_note}")
        chatbot = gr.Chatbot(label="chat", elem_id="chat")
        with gr.Row():
            question = gr.Textbox(label="question", placeholder="What is in the picture?", elem_id="question", scale=4)
            ask = gr.Button("Ask", elem_id="ask-btn", scale=1)
        short = gr.Checkbox(False, label="short answer (a word or number, as the VQA scores ask)", elem_id="short")
        swapped_answer = gr.Markdown(elem_id="swapped-answer")

        with gr.Accordion("run card", open=False):
            card = gr.Markdown(session.card(), elem_id="card")
            reload = gr.Button("reload card")

        pick.change(session.pick, pick, [upload, preview], api_name="pick")
        upload.change(session.preview, upload, [preview, status], api_visibility="private")
        caption_btn.click(
            session.caption, [upload, swap_with], [caption, swapped, swapped_image, status], api_name="caption"
        )
        attention_btn.click(session.attention, upload, [attention, status], api_name="attention")
        chat_io = ([upload, chatbot, question, swap_with, short], [chatbot, swapped_answer, status, question])
        ask.click(session.chat, *chat_io, api_name="chat")
        question.submit(session.chat, *chat_io, api_visibility="private")
        reload.click(session.card, None, card, api_name="card")
    return app


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int | None = None, block: bool = True):
    """Loads the run, builds the page and starts the server; returns (app, url)."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit(
            "vlmlab serve needs gradio: pip install -e '.[app]' && pip install --no-deps gradio==6.31.0"
        ) from None
    start = time.perf_counter()
    session = RunSession(run_dir)
    app = build_app(session).queue(default_concurrency_limit=1)
    _, url, _ = app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        theme=_offline_theme(),
        footer_links=["api"],
        max_file_size="50mb",
    )
    print(f"vlmlab serve: {session.run_dir} at {url} (ready in {time.perf_counter() - start:.1f} s)", flush=True)
    if block:
        app.block_thread()
    return app, url


def _offline_theme():
    """System fonts only: gradio's default theme loads Google Fonts, which an offline machine cannot reach."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
