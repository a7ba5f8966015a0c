"""`prima demo --web`: a Gradio page to upload 1-5 images, ask a question, and see the grounded answer.

Safety choices (docs/INFERENCE.md repeats them):
- binds 127.0.0.1 unless ``--host`` says otherwise;
- refuses any uploaded file over ``max_upload_mb`` (default 10 MB): Gradio rejects it at upload time,
  and the handler checks again before decoding;
- every file Gradio stores (uploads, rendered overlays) goes into one temporary folder created at
  start (``GRADIO_TEMP_DIR`` is pointed at it before Gradio is imported) and removed on exit;
  the app itself writes no files;
- input errors show the same message the CLI prints, in the page, instead of failing the request.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from prima.errors import PrimaError
from prima.inference.predictor import PrimaPredictor
from prima.inference.render import answer_html, render_overlays

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_MB = 10.0
TITLE = "PRIMA: multi-image pixel-grounded reasoning segmentation"
CSS = """
.prima-answer { font-size: 1.15em; line-height: 1.9; }
.prima-image { color: #555; margin-left: 2px; }
.prima-error { color: #b00020; font-weight: 600; }
"""


def prepare_temp_dir(temp_dir: str | Path | None = None) -> Path:
    """Create (or use) the one folder the app may write to, and point Gradio at it before it is imported."""
    path = Path(temp_dir) if temp_dir is not None else Path(tempfile.mkdtemp(prefix="prima-web-"))
    path.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(path)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the machine may be offline
    import sys

    if "gradio" in sys.modules:  # Gradio fixes its upload folder at import time
        from gradio import route_utils

        if Path(route_utils.DEFAULT_TEMP_DIR).resolve() != path.resolve():
            raise PrimaError(
                "gradio was imported before the web demo chose its temp folder; "
                "start it with `prima demo --web` (or call prepare_temp_dir first)"
            )
    return path


class DemoHandler:
    """The function behind the Ask button: files + question in, (answer HTML, overlays, summary) out."""

    def __init__(self, predictor: PrimaPredictor, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB):
        self.predictor = predictor
        self.max_upload_bytes = int(max_upload_mb * 1024 * 1024)
        self.max_upload_mb = max_upload_mb

    def __call__(self, files: Any, question: str) -> tuple[str, list, dict | None]:
        try:
            return self._answer(self._paths(files), question)
        except PrimaError as e:
            return error_html(str(e)), [], None
        except Exception as e:  # never fail the request: say what happened, keep the app alive
            log.exception("web demo: unexpected error")
            return error_html(f"internal error ({type(e).__name__}: {e}); see the server log"), [], None

    def _paths(self, files: Any) -> list[Path]:
        if files is None:
            files = []
        if not isinstance(files, list):
            files = [files]
        paths = [Path(f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", f)) for f in files]
        for p in paths:
            if p.is_file() and p.stat().st_size > self.max_upload_bytes:
                raise PrimaError(f"{p.name} is larger than the {self.max_upload_mb:g} MB upload limit")
        return paths

    def _answer(self, paths: list[Path], question: str) -> tuple[str, list, dict]:
        question = self.predictor.check_question(question)
        try:
            images = self.predictor.load(paths)
        except PrimaError as e:  # show the file name the user knows, not Gradio's temp path
            message = str(e)
            for p in paths:
                message = message.replace(str(p), p.name)
            raise PrimaError(message) from None
        prediction = self.predictor.predict_loaded(images, question)
        overlays = render_overlays(images, prediction)
        gallery = [(picture, f"image {k}: {p.name}") for k, (picture, p) in enumerate(zip(overlays, paths), start=1)]
        segments = []
        for s in prediction.segments:
            row = {"phrase": s.phrase, "image": s.image, "score": round(s.score, 3), "bbox": s.bbox}
            if s.support is not None:  # a checkpoint with grounding.phrase_check
                row["support"] = round(s.support, 3)
            segments.append(row)
        summary = {"answer": prediction.answer, "segments": segments}
        if prediction.first_answer is not None:
            summary["first_answer"] = prediction.first_answer
        return answer_html(prediction), gallery, summary


def error_html(message: str) -> str:
    import html

    return f'<div class="prima-error">error: {html.escape(message)}</div>'


def example_queries(max_images: int) -> list[list]:
    """``[[image paths], question]`` of each scene in examples/queries.jsonl (none if the file is absent)."""
    from prima.inference.batch import read_queries
    from prima.inference.demo import EXAMPLES

    if not EXAMPLES.is_file():
        return []
    try:
        queries = read_queries(EXAMPLES)
    except PrimaError as e:  # a broken examples file must not stop the demo
        log.warning("web demo: no examples: %s", e)
        return []
    return [[[str(p) for p in q.paths], q.question] for q in queries if len(q.paths) <= max_images]


def build_app(predictor: PrimaPredictor, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB) -> Any:
    """The Gradio Blocks app (call `prepare_temp_dir` before this, so Gradio stores files there)."""
    import gradio as gr

    handler = DemoHandler(predictor, max_upload_mb)
    with gr.Blocks(title="PRIMA demo") as app:
        gr.Markdown(
            f"## {TITLE}\nUpload 1 to {predictor.max_images} images (at most {max_upload_mb:g} MB each), ask a "
            "question, and every object or part the answer names is highlighted in the colour of its mask."
        )
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(
                    label=f"Images (1 to {predictor.max_images})",
                    file_count="multiple",
                    file_types=["image"],
                    type="filepath",
                    elem_id="prima-files",
                )
                question = gr.Textbox(
                    label="Question", placeholder="Which object appears in every image?", elem_id="prima-question"
                )
                ask = gr.Button("Ask", variant="primary", elem_id="prima-ask")
            with gr.Column(scale=2):
                answer = gr.HTML(label="Answer", elem_id="prima-answer")
                overlays = gr.Gallery(
                    label="Masks",
                    columns=3,
                    height="auto",
                    format="png",
                    object_fit="contain",
                    elem_id="prima-overlays",
                )
                details = gr.JSON(label="Segments", elem_id="prima-details")
        examples = example_queries(predictor.max_images)
        if examples:
            gr.Examples(examples=examples, inputs=[files, question], label="Examples (from examples/)")
        ask.click(handler, inputs=[files, question], outputs=[answer, overlays, details])
        question.submit(handler, inputs=[files, question], outputs=[answer, overlays, details])
    return app


def serve(
    checkpoint: str | Path | None = None,
    device: str = "cpu",
    host: str = "127.0.0.1",
    port: int = 7860,
    max_upload_mb: float | None = None,
) -> int:
    """Load the checkpoint, start the app on host:port, block until Ctrl-C, then remove the temp folder."""
    max_upload_mb = DEFAULT_MAX_UPLOAD_MB if max_upload_mb is None else max_upload_mb
    if max_upload_mb <= 0:
        raise PrimaError(f"--max-upload-mb must be positive, got {max_upload_mb:g}")
    if not 0 < port < 65536:
        raise PrimaError(f"--port must be 1..65535, got {port}")
    predictor = PrimaPredictor.from_pretrained(checkpoint, device=device)  # fail before starting a server
    temp_dir = prepare_temp_dir()
    try:
        app = build_app(predictor, max_upload_mb)
        try:
            app.launch(
                server_name=host,
                server_port=port,
                max_file_size=int(max_upload_mb * 1024 * 1024),
                ssr_mode=False,
                share=False,
                run_history=False,
                mcp_server=False,
                footer_links=[],
                css=CSS,
                quiet=True,
                prevent_thread_lock=True,
            )
        except OSError as e:  # e.g. the port is taken
            raise PrimaError(f"cannot start the web demo on {host}:{port}: {e}") from None
        print(
            f"PRIMA web demo on http://{host}:{port}  (uploads and overlays kept in {temp_dir}; Ctrl-C stops)",
            flush=True,
        )
        app.block_thread()  # until Ctrl-C, then Gradio closes the server
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
        if temp_dir.exists():  # a file still open or still being written
            print(f"prima demo --web: could not remove {temp_dir} completely; delete it by hand", flush=True)
        else:
            print(f"PRIMA web demo stopped; removed {temp_dir}", flush=True)
    return 0
