"""The web demo in a real headless Chromium: upload two images, ask, see the answer and the overlays.

The app runs as `prima demo --web` in a subprocess (the way a user starts it) on a free port of
127.0.0.1, with a tiny random checkpoint, its own TMPDIR and an empty working folder, so the test
can check that nothing is written outside the app's temp folder and that the folder is removed on
exit. Chromium is Debian's (`apt-get install chromium`), driven by Playwright for Python; no
browser is downloaded.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_predictor import build_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory)  # the random checkpoint of test_predictor, built once


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UPLOAD_LIMIT_MB = 1
WAIT_MS = 120_000  # generous: two cores are shared by many processes

pytestmark = pytest.mark.browser

if not os.path.exists(CHROMIUM):
    pytest.skip(
        "chromium is not installed (apt-get install -y chromium); the browser test needs it", allow_module_level=True
    )
playwright_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    """`prima demo --web` on a free port; yields (url, its TMPDIR, its working folder)."""
    root = tmp_path_factory.mktemp("web")
    workdir, tmpdir = root / "cwd", root / "tmp"
    workdir.mkdir()
    tmpdir.mkdir()
    port = _free_port()
    python_path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": python_path, "HF_HUB_OFFLINE": "1"}
    log = (root / "server.log").open("w")
    cmd = [sys.executable, "-m", "prima", "demo", "--web", "--port", str(port)]
    cmd += ["--checkpoint", str(tiny_checkpoint), "--max-upload-mb", str(UPLOAD_LIMIT_MB)]
    # a background job (`make test &`, nohup) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt:
    # give the server Ctrl-C back, as an interactive user has it
    restore_ctrl_c = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=restore_ctrl_c)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + WAIT_MS / 1000
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the web demo exited with {proc.returncode}:\n{(root / 'server.log').read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the web demo did not answer on {url}:\n{(root / 'server.log').read_text()}")
        time.sleep(0.5)
    yield url, tmpdir, workdir
    proc.send_signal(signal.SIGINT)  # Ctrl-C: the app's own shutdown path, which removes its temp folder
    try:
        proc.wait(timeout=WAIT_MS / 1000)
        how = f"exited with {proc.returncode}"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        how = f"did not exit within {WAIT_MS // 1000} s of Ctrl-C and was killed"
    log.close()
    left = [p.name for p in tmpdir.iterdir()]
    output = (root / "server.log").read_text()
    assert left == [], f"the web demo {how} and left {left} in its TMPDIR; its output:\n{output}"
    assert "web demo stopped; removed" in output, output


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh user-data-dir
    with playwright_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 1000},
        )
        page = context.pages[0] if context.pages else context.new_page()
        page.set_default_timeout(WAIT_MS)
        yield page
        context.close()


def _open(page, url):
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector("#prima-files input[type=file]", state="attached")


def _upload(page, paths):
    page.set_input_files("#prima-files input[type=file]", [str(p) for p in paths])
    stems = [p.stem for p in paths]  # the upload is done when the file list shows every name
    page.wait_for_function(
        "stems => stems.every(s => document.querySelector('#prima-files').innerText.includes(s))", arg=stems
    )


def _ask(page, question):
    page.fill("#prima-question textarea", question)
    page.click("#prima-ask")


def _scenes(folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(96, 64), (64, 80)], start=1):
        a = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        a[h // 4 : h // 2, w // 4 : w // 2] = (200, 40, 40)  # a red block to talk about
        p = folder / f"scene{i}.png"
        Image.fromarray(a).save(p)
        paths.append(p)
    return paths


def test_two_images_question_answer_and_overlays(server, page, tmp_path):
    url, tmpdir, _ = server
    _open(page, url)
    _upload(page, _scenes(tmp_path))
    _ask(page, "Which object appears in every image?")
    answer = page.wait_for_selector("#prima-answer .prima-answer, #prima-answer .prima-error")
    assert "prima-answer" in answer.get_attribute("class"), answer.inner_text()
    assert answer.inner_text().strip()
    page.wait_for_function("document.querySelectorAll('#prima-overlays img').length >= 2")
    sources = [im.get_attribute("src") for im in page.query_selector_all("#prima-overlays img")]
    assert len(sources) == 2
    for src in sources:  # served from the app's temp folder, which lives under the TMPDIR we gave it
        assert str(tmpdir.resolve()) in src or str(tmpdir) in src, src
    for k, name in ((1, "scene1.png"), (2, "scene2.png")):
        assert page.locator(f"#prima-overlays :text('image {k}: {name}')").count() >= 1
    shot = Path(os.environ.get("PRIMA_WEB_SCREENSHOT", tmp_path / "web.png"))
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 0


def test_input_errors_are_shown_in_the_page_like_the_cli(server, page, tmp_path):
    url, _, _ = server
    good, _ = _scenes(tmp_path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:-50])

    _open(page, url)
    _ask(page, "")  # no images, no question
    error = page.wait_for_selector("#prima-answer .prima-error")
    assert error.inner_text() == "error: the question is empty: ask something about the images"

    _upload(page, [good, broken])
    _ask(page, "What is in image 2?")
    page.wait_for_function("document.querySelector('#prima-answer').innerText.includes('broken.png')")
    text = page.inner_text("#prima-answer .prima-error")
    assert text.startswith("error: image 2 (broken.png): truncated or corrupt image data"), text
    assert page.query_selector_all("#prima-overlays img") == []


def test_uploads_over_the_limit_are_refused(server, page, tmp_path):
    url, _, _ = server
    big = tmp_path / "big.png"
    side = 800  # random pixels do not compress: ~1.9 MB, over the 1 MB limit the server was started with
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > UPLOAD_LIMIT_MB * 1024 * 1024
    _open(page, url)
    page.set_input_files("#prima-files input[type=file]", [str(big)])
    page.wait_for_selector(":text('exceed the maximum allowed size')")


def test_nothing_is_written_outside_the_temp_folder(server):
    _, tmpdir, workdir = server
    assert list(workdir.iterdir()) == []
    apps = [p.name for p in tmpdir.iterdir()]
    assert apps and all(name.startswith("prima-web-") for name in apps), apps


def test_an_example_from_the_repository_fills_in_images_and_question(server, page):
    from prima.inference.batch import read_queries

    url, _, _ = server
    example = read_queries(REPO / "examples" / "queries.jsonl")[-1]
    _open(page, url)
    page.get_by_text(example.question).first.click()
    page.wait_for_function("q => document.querySelector('#prima-question textarea').value === q", arg=example.question)
    files = page.inner_text("#prima-files")
    assert all(Path(p).stem in files for p in example.images), files
