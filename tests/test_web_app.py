"""`vlmlab serve` end to end: a tiny Q-Former run served on a free loopback port, every endpoint called with
gradio_client, bad uploads answered in words while the server keeps serving, and a real headless Chromium
(Debian's, driven by playwright) uploading an image and reading the caption off the page."""

import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmlab.config import load_config
from vlmlab.data.pairs import load_samples
from vlmlab.run import load_run
from vlmlab.train.loop import train

pytest.importorskip("gradio", reason="the `app` extra (gradio) is not installed")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_config):
    """(url, run_dir, test images, scratch dir) of a server on 127.0.0.1 serving a tiny trained run."""
    from vlmlab.app.web import serve

    root = tmp_path_factory.mktemp("web")
    old = os.environ.get("VLMLAB_CACHE")
    os.environ["VLMLAB_CACHE"] = str(root / "cache")
    run_dir = train(tiny_config(root, "train.max_steps=4", "train.eval_every=4"))
    start = time.perf_counter()
    app, url = serve(run_dir, host="127.0.0.1", port=_free_port(), block=False)
    print(f"server up in {time.perf_counter() - start:.1f} s at {url}")
    tests = load_samples(load_config(Path(run_dir) / "config.yaml"))["test"]
    images = [s.image_path for s in tests]  # the run's test images: the ones /pick and the swap offer
    yield url, Path(run_dir), images, root
    app.close()
    if old is None:
        os.environ.pop("VLMLAB_CACHE", None)
    else:
        os.environ["VLMLAB_CACHE"] = old


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served[0], verbose=False)


def _bad_uploads(folder: Path) -> dict[str, Path]:
    folder.mkdir(exist_ok=True)
    bad = {
        "text file": folder / "notes.png",
        "text file, honest name": folder / "notes.txt",
        "1x1 image": folder / "dot.png",
        "bomb": folder / "bomb.png",
        "truncated": folder / "cut.png",
    }
    bad["text file"].write_text("this is not an image")
    bad["text file, honest name"].write_text("this is not an image either")
    Image.new("RGB", (64, 64), (0, 90, 200)).save(bad["truncated"])
    bad["truncated"].write_bytes(bad["truncated"].read_bytes()[:60])
    Image.new("RGB", (1, 1), (255, 0, 0)).save(bad["1x1 image"])
    # a valid PNG header claiming 20000 x 20000 pixels: refused from the header, before any pixel is decoded
    Image.new("1", (20000, 20000)).save(bad["bomb"], optimize=True)
    return bad


def _awkward_but_fine(folder: Path) -> dict[str, Path]:
    """Images that are real but not 8-bit RGB: each must be captioned."""
    rng = np.random.default_rng(0)
    out = {
        "cmyk": folder / "cmyk.jpg",
        "16-bit": folder / "gray16.png",
        "alpha": folder / "alpha.png",
    }
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).convert("CMYK").save(out["cmyk"])
    Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)).save(out["16-bit"])
    Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8), "RGBA").save(out["alpha"])
    return out


def test_caption_endpoint_and_swapped_image(client, served):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    _, _, images, _ = served
    caption, swapped, swapped_image, status = client.predict(handle_file(images[0]), None, api_name="/caption")
    assert caption.strip() and status == ""
    assert swapped_image is not None and swapped.strip()  # by default another test image is swapped in
    assert Path(images[0]).name not in swapped
    other = Path(images[1]).name
    again, swapped2, _, status = client.predict(handle_file(images[0]), other, api_name="/caption")
    assert status == "" and again == caption  # greedy decoding: the same image gives the same caption
    assert f"({other}" in swapped2  # the swapped image the user picked, named beside its caption
    # what the page shows is what the model writes for each image alone (no mix-up inside the batch of two)
    model = load_run(served[1])
    assert model.caption([images[0]]) == [caption]
    assert swapped2.startswith(model.caption([images[1]])[0] + "  (")
    with pytest.raises(AppError, match="not in the list of choices"):  # gradio checks dropdown values itself
        client.predict(handle_file(images[0]), "no-such.png", api_name="/caption")


def test_chat_endpoint_keeps_the_conversation(client, served):
    from gradio_client import handle_file

    from vlmlab.app.web import _text_of

    image = served[2][0]
    history, swapped_answer, status, question = client.predict(
        handle_file(image), [], "What is in the image?", None, False, api_name="/chat"
    )
    assert status == "" and question == ""
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert _text_of(history[0]["content"]) == "What is in the image?"  # gradio 6 returns content as parts
    assert isinstance(swapped_answer, str)
    history2, _, status2, _ = client.predict(
        handle_file(image), history, "And its colour?", None, False, api_name="/chat"
    )
    assert status2 == ""
    assert [m["role"] for m in history2] == ["user", "assistant", "user", "assistant"]


def test_a_short_answer_is_asked_as_vlmlab_chat_short_asks_it(client, served):
    from gradio_client import handle_file

    from vlmlab.app.web import _text_of, read_upload
    from vlmlab.data.grounded_questions import VQA_SUFFIX

    image = served[2][0]
    history, _, status, _ = client.predict(handle_file(image), [], "What colour is it?", None, True, api_name="/chat")
    assert status == ""
    asked = _text_of(history[0]["content"])
    assert asked == "What colour is it?" + VQA_SUFFIX
    # the reply is the model's to exactly that question (what the page shows is what the model writes)
    model = load_run(served[1])
    expected = model.chat_batch([read_upload(image)], [[{"role": "user", "content": asked}]])[0]
    assert _text_of(history[1]["content"]) == expected


def test_attention_endpoint_draws_the_query_maps(client, served):
    from gradio_client import handle_file

    png, status = client.predict(handle_file(served[2][0]), api_name="/attention")
    assert status == ""
    with Image.open(png) as im:
        assert im.width > 200 and im.height > 100  # the image panel plus 4 query panels


def test_card_and_pick_endpoints(client, served):
    from gradio_client.exceptions import AppError

    card = client.predict(api_name="/card")
    assert "Parameters" in card and "connector" in card and "qformer" in card
    assert "not evaluated yet" in card  # the tiny run has no eval.md
    name = Path(served[2][0]).name
    picked, preview = client.predict(name, api_name="/pick")
    assert Path(picked).name == name and Path(picked).read_bytes() == Path(served[2][0]).read_bytes()
    assert preview is not None
    with pytest.raises(AppError, match="not in the list of choices"):
        client.predict("../../etc/passwd", api_name="/pick")  # only the run's own test images are handed out


def test_bad_uploads_give_a_message_and_the_server_keeps_serving(client, served):
    from gradio_client import handle_file

    root = served[3]
    for kind, path in _bad_uploads(root / "bad").items():
        caption, _, _, status = client.predict(handle_file(str(path)), None, api_name="/caption")
        assert caption == "", kind
        assert status.startswith("**Could not use this upload.**"), (kind, status)
        assert path.name in status and "Traceback" not in status, (kind, status)
    for kind, path in _awkward_but_fine(root / "bad").items():
        caption, _, _, status = client.predict(handle_file(str(path)), None, api_name="/caption")
        assert status == "" and caption.strip(), kind
    caption, _, _, status = client.predict(handle_file(served[2][1]), None, api_name="/caption")
    assert status == "" and caption.strip()  # still serving


@pytest.mark.slow
def test_real_browser_uploads_an_image_and_sees_its_caption(served, tmp_path):
    """Debian's Chromium (no browser download), driven by playwright, loads the page, uploads a test image,
    presses Caption and waits for the caption and the swapped-image caption; then the attention maps and a
    chat turn. No request may leave the loopback (the page must work offline). Screenshot kept for a look."""
    from urllib.parse import urlparse

    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():  # CI installs it and fails on any skip (VLMLAB_NO_SKIPS=1)
        pytest.skip("Debian chromium is not installed: apt-get install chromium")
    url, _, images, _ = served
    shots = Path(os.environ.get("VLMLAB_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    outside = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.on("request", lambda r: urlparse(r.url).hostname not in ("127.0.0.1", None) and outside.append(r.url))
        page.goto(url)
        page.locator("#upload input[type=file]").set_input_files(images[0])
        page.wait_for_selector("#preview img", timeout=60_000)  # the upload arrived and was read
        page.click("#caption-btn")
        page.wait_for_function("() => document.querySelector('#caption textarea').value.length > 0", timeout=60_000)
        page.wait_for_function(
            "() => document.querySelector('#swapped-caption textarea').value.length > 0", timeout=60_000
        )
        caption = page.locator("#caption textarea").input_value()
        swapped = page.locator("#swapped-caption textarea").input_value()
        page.click("#attention-btn")
        page.wait_for_selector("#attention img", timeout=60_000)
        page.locator("#question textarea").fill("What is in the picture?")
        page.click("#ask-btn")
        page.wait_for_function(
            "() => document.querySelector('#swapped-answer').innerText.includes('instead')", timeout=60_000
        )
        page.wait_for_timeout(500)
        page.screenshot(path=str(shots / "web_app.png"), full_page=True)
        status = page.locator("#status").inner_text()
        # a bad upload in a fresh page: the message appears in the page, no stack trace
        bad = _bad_uploads(tmp_path / "bad")["text file"]
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.locator("#upload input[type=file]").set_input_files(str(bad))
        page.wait_for_function(
            "() => document.querySelector('#status').innerText.includes('Could not use this upload')", timeout=60_000
        )
        bad_status = page.locator("#status").inner_text()
        page.screenshot(path=str(shots / "web_app_bad_upload.png"))
        browser.close()
    assert bad.name in bad_status and "Traceback" not in bad_status
    assert caption.strip() and swapped.strip()
    assert "Could not use" not in status and "failed" not in status
    assert not outside, f"the page fetched from outside the machine: {outside[:5]}"


@pytest.mark.slow
def test_vlmlab_serve_command_answers_the_page(served):
    """The console command as a user runs it: `vlmlab serve RUN --port N` in its own process; it says where it
    serves, the page there names the run and asks for no web font (offline)."""
    import subprocess
    import sys
    import threading
    import urllib.request

    run_dir, port = served[1], _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "-m", "vlmlab.cli", "serve", str(run_dir), "--port", str(port)]
    start = time.perf_counter()
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(180, server.kill)  # a server that never says it is ready fails the test, not hangs it
    watchdog.start()
    try:
        output = []
        for line in server.stdout:  # ends if the process dies
            output.append(line)
            if line.startswith("vlmlab serve:"):
                break
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
            page = response.read().decode()
        print(f"`vlmlab serve` answered in {time.perf_counter() - start:.1f} s")
    finally:
        watchdog.cancel()
        server.terminate()
        server.wait(timeout=30)
    assert f"at http://127.0.0.1:{port}/" in output[-1], "".join(output)[-3000:]
    assert f"vlmlab: {run_dir.name}" in page  # the page title
    assert "fonts.googleapis" not in page and "fonts.gstatic" not in page


def test_serve_without_a_run_trains_the_demo_run_first_with_a_progress_bar_then_reuses_it(
    tmp_path, tiny_config, monkeypatch, capsys
):
    """`vlmlab serve` with no RUN_DIR serves the demo run: absent, it is trained first (progress bar on stderr);
    finished, it is reused as it is. The embedded defaults are swapped for a tiny config of the same shape."""
    import vlmlab.config
    from vlmlab.cli import demo_run_dir

    monkeypatch.setenv("VLMLAB_CACHE", str(tmp_path / "cache"))
    tiny = tiny_config(tmp_path, "train.max_steps=4", "train.eval_every=4")
    monkeypatch.setattr(vlmlab.config, "load_config", lambda *args, **kwargs: tiny)

    run = demo_run_dir()
    first = capsys.readouterr()
    assert run == Path(tiny.train.output_dir) and (run / "checkpoint").is_dir()
    assert "no demo run" in first.out and "training it first" in first.out
    assert "training" in first.err and "4/4" in first.err  # tqdm's bar reached the last step
    weights = sorted(p.stat().st_mtime_ns for p in (run / "checkpoint").rglob("*") if p.is_file())
    metrics = (run / "metrics.jsonl").read_text()

    assert demo_run_dir() == run
    assert "training it first" not in capsys.readouterr().out
    assert (run / "metrics.jsonl").read_text() == metrics  # not one more step
    assert sorted(p.stat().st_mtime_ns for p in (run / "checkpoint").rglob("*") if p.is_file()) == weights
    assert load_run(run).caption([load_samples(tiny)["test"][0].image_path])[0]  # it captions


def test_a_model_whose_data_is_elsewhere_is_served_with_uploads_only(capsys):
    """A zoo model served on a machine without its training data: no test images to pick, no failure."""
    from vlmlab.app.web import test_images

    def absent(cfg):
        raise FileNotFoundError("coco:/nowhere/coco2017-val does not exist")

    assert test_images(None, absent) == {}
    assert "upload images instead" in capsys.readouterr().out
