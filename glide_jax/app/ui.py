"""The page (Gradio Blocks): prompt -> Generate -> a gallery; select an image, paint the region to
change in the editor, caption it, Inpaint; Upsample; each result downloadable as a PNG with its
settings, and the `glide-jax sample` command that writes it.

A mistake (an empty prompt, a mask that keeps everything or nothing, a button whose bundle is
missing or of the wrong kind) is a message in the `status` element, never a traceback. The element
ids (`prompt`, `generate`, `editor`, `status`, ...) are stable: tests/test_app_browser.py drives them.
"""
from __future__ import annotations

import logging
import os
import pathlib
import tempfile
import time
import traceback
import uuid

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home, before gradio is imported

import gradio as gr

from glide_jax.app import core
from glide_jax.errors import UserError

log = logging.getLogger(__name__)

CSS = """
#editor canvas { image-rendering: pixelated; }
#gallery img, #history img, #result img { image-rendering: pixelated; }
#result img { width: 100%; height: 100%; object-fit: contain; }
"""


class Session:
  """One browser tab's results and the selected one."""

  def __init__(self, root: pathlib.Path):
    self.store = core.Store(root / uuid.uuid4().hex[:12])
    self.selected: int | None = None
    self.events = 0

  def say(self, message: str) -> str:
    """The status line: the message, then the time and a count, so a repeated message still shows
    that the click was answered."""
    self.events += 1
    return f"{message} [{time.strftime('%H:%M:%S')}, {self.events}]"


def theme():
  """Gradio's default look with system fonts, so the page loads nothing from the network."""
  return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                           font_mono=["ui-monospace", "monospace"])


def build(models: core.Models, out_dir: str | os.PathLike | None = None):
  """The gr.Blocks page for `models`; results are written under out_dir (default: a temp directory)."""
  root = pathlib.Path(out_dir or tempfile.mkdtemp(prefix="glide-jax-app-"))
  root.mkdir(parents=True, exist_ok=True)
  base_d = core.defaults(models.base)
  inp_d = core.defaults(models.inpaint) if models.inpaint is not None else base_d
  up_d = core.defaults(models.upsample) if models.upsample is not None else {"sampler": "ddim", "steps": "fast27",
                                                                             "temperature": 0.997}

  def session(state):
    return state if state is not None else Session(root)

  def gallery_items(results):
    return [(str(r.path), r.label) for r in results]

  def selection(sess, rid):
    """Updates for (result, editor, metadata, command, download) showing result `rid`."""
    r = sess.store.get(rid)
    sess.selected = rid
    return (str(r.path), core.editor_value(r.image), r.metadata, r.command, str(r.path))

  no_selection = (gr.skip(),) * 5

  def failed(e: Exception) -> str:
    if isinstance(e, UserError):
      return str(e)
    log.error("app: %s", traceback.format_exc())
    return f"internal error ({type(e).__name__}: {e}); the server's log has the traceback"

  def on_generate(state, prompt, guidance, sampler, steps, seed, batch, clip_scale, progress=gr.Progress()):  # noqa: B008 - gradio injects it
    sess = session(state)
    try:
      results = core.generate(models, sess.store, prompt, guidance, sampler, steps, seed, batch, clip_scale,
                              progress=progress)
    except Exception as e:  # noqa: BLE001 - every failure is a status message
      return (sess, sess.say(failed(e)), gr.skip(), gr.skip()) + no_selection
    status = f"generated {len(results)} image(s) #{results[0].id}-#{results[-1].id} for {results[0].batch.settings['prompt']!r}"
    return (sess, sess.say(status), gallery_items(results), gallery_items(sess.store.results)) + selection(sess, results[0].id)

  def on_inpaint(state, value, caption, guidance, sampler, steps, seed, batch, progress=gr.Progress()):  # noqa: B008 - gradio injects it
    sess = session(state)
    try:
      source = sess.store.get(sess.selected) if sess.selected is not None else None
      results, note = core.inpaint(models, sess.store, value, caption, guidance, sampler, steps, seed, batch,
                                   source=source, progress=progress)
    except Exception as e:  # noqa: BLE001
      return (sess, sess.say(failed(e)), gr.skip(), gr.skip()) + no_selection
    kept = results[0].batch.settings["known_fraction"]
    status = (f"inpainted {len(results)} image(s) #{results[0].id}-#{results[-1].id}: {kept:.0%} of the "
              f"pixels kept, the rest drawn for {results[0].batch.settings['prompt']!r}" + (f"; {note}" if note else ""))
    return (sess, sess.say(status), gallery_items(results), gallery_items(sess.store.results)) + selection(sess, results[0].id)

  def on_upsample(state, temperature, steps, sampler, progress=gr.Progress()):  # noqa: B008 - gradio injects it
    sess = session(state)
    try:
      result = core.upsample(models, sess.store, sess.store.get(sess.selected), temperature, steps, sampler,
                             progress=progress)
    except Exception as e:  # noqa: BLE001
      return (sess, sess.say(failed(e)), gr.skip(), gr.skip()) + no_selection
    size = result.image.shape[0]
    status = f"upsampled #{result.parent} to {size}x{size} px as #{result.id}"
    return (sess, sess.say(status), gallery_items([result]), gallery_items(sess.store.results)) + selection(sess, result.id)

  mask_size = int((models.inpaint or models.base).image_size)  # the rectangle's model pixels

  def on_rectangle(state, value, left, top, right, bottom):
    sess = session(state)
    try:
      painted = core.paint_rectangle(value, mask_size, left, top, right, bottom)
    except Exception as e:  # noqa: BLE001 - every failure is a status message
      return sess, sess.say(failed(e)), gr.skip()
    status = (f"painted the rectangle x {int(left)}-{int(right) - 1}, y {int(top)}-{int(bottom) - 1} of the "
              f"{mask_size} px image; caption it and press Inpaint")
    return sess, sess.say(status), painted

  def on_select(state, evt, which: str):
    sess = session(state)
    try:
      items = sess.store.results if which == "history" else None
      if items is None:  # the gallery shows the latest batch: the last results added
        items = sess.store.results[-_latest_count(sess.store):]
      r = items[evt.index]
      return (sess, sess.say(f"selected #{r.id} ({r.label})")) + selection(sess, r.id)
    except Exception as e:  # noqa: BLE001
      return (sess, sess.say(failed(e))) + no_selection

  def on_select_gallery(state, evt: gr.SelectData):
    return on_select(state, evt, "gallery")

  def on_select_history(state, evt: gr.SelectData):
    return on_select(state, evt, "history")

  with gr.Blocks(title="glide-jax", analytics_enabled=False) as page:
    state = gr.State(None)
    gr.Markdown("## glide-jax\nGenerate from a prompt, then select an image, paint the region to change, "
                "caption it and Inpaint; Upsample the selected image.")
    status = gr.Textbox(label="Status", elem_id="status", interactive=False, lines=1, max_lines=3,
                        value=_start_status(models))
    with gr.Row():
      with gr.Column(scale=1):
        prompt = gr.Textbox(label="Prompt", elem_id="prompt", placeholder="a red circle on the left")
        guidance = gr.Number(label="Guidance scale", value=base_d["guidance"], elem_id="guidance")
        sampler = gr.Dropdown(list(core.SAMPLERS), value=base_d["sampler"], label="Sampler", elem_id="sampler")
        steps = gr.Textbox(label="Steps (or a respacing spec)", value=base_d["steps"], elem_id="steps")
        seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
        batch = gr.Number(label="Batch size", value=4, precision=0, minimum=1, maximum=core.MAX_BATCH,
                          elem_id="batch")
        clip_scale = gr.Number(label="CLIP guidance scale (0 = classifier-free guidance)", value=0.0,
                               interactive=models.clip is not None, elem_id="clip-guidance",
                               info=models.reason("clip"))
        generate = gr.Button("Generate", variant="primary", elem_id="generate",
                             interactive=models.reason("generate") is None)
        gr.Markdown(models.reason("generate") or "", elem_id="generate-note")
      with gr.Column(scale=2):
        gallery = gr.Gallery(label="Latest batch (click to select)", elem_id="gallery", columns=4, height=300,
                             allow_preview=False, object_fit="contain")
    with gr.Row():
      with gr.Column(scale=2):
        editor = gr.ImageEditor(label="Paint the region to change (brush or rectangle; the eraser takes paint away)",
                                elem_id="editor", type="numpy", image_mode="RGBA", sources=("upload",), format="png",
                                transforms=(), layers=False, canvas_size=(core.EDITOR_SIZE, core.EDITOR_SIZE),
                                brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed", default_size=12),
                                eraser=gr.Eraser(default_size=12), height=420)
        with gr.Row(equal_height=True):
          quarter = mask_size // 4
          # no minimum/maximum: core.paint_rectangle's message says what is wrong, in the status line
          rect = [gr.Number(label=label, value=v, precision=0, elem_id=f"rect-{name}", min_width=80)
                  for name, label, v in (("left", "Rectangle: left", quarter), ("top", "top", quarter),
                                         ("right", "right (excluded)", mask_size - quarter),
                                         ("bottom", "bottom (excluded)", mask_size - quarter))]
          paint_rect = gr.Button("Paint rectangle", elem_id="paint-rectangle", min_width=120)
      with gr.Column(scale=1):
        edit_prompt = gr.Textbox(label="What the painted region should show", elem_id="edit-prompt")
        inpaint = gr.Button("Inpaint", variant="primary", elem_id="inpaint",
                            interactive=models.reason("inpaint") is None)
        gr.Markdown(models.reason("inpaint") or f"Inpainting bundle: {models.paths.get('inpaint')}",
                    elem_id="inpaint-note")
        up_temp = gr.Number(label="Upsample temperature", value=up_d["temperature"], elem_id="upsample-temperature")
        up_steps = gr.Textbox(label="Upsample steps", value=up_d["steps"], elem_id="upsample-steps")
        up_sampler = gr.Dropdown(list(core.SAMPLERS), value=up_d["sampler"], label="Upsample sampler",
                                 elem_id="upsample-sampler")
        upsample = gr.Button("Upsample", elem_id="upsample", interactive=models.reason("upsample") is None)
        gr.Markdown(models.reason("upsample") or f"Upsampler bundle: {models.paths.get('upsample')}",
                    elem_id="upsample-note")
    with gr.Row():
      result = gr.Image(label="Selected result", elem_id="result", type="filepath", interactive=False, height=300)
      with gr.Column():
        metadata = gr.JSON(label="Settings (also in the PNG's text metadata)", elem_id="metadata")
        command = gr.Textbox(label="The same image from the command line (DIR/<output>)", elem_id="command",
                             interactive=False, lines=3)
        download = gr.File(label="Download PNG", elem_id="download", interactive=False)
    history = gr.Gallery(label="History (every result this session; click to select)", elem_id="history",
                         columns=8, height=220, allow_preview=False, object_fit="contain")

    shown = [result, editor, metadata, command, download]
    outputs = [state, status, gallery, history] + shown
    generate.click(on_generate, [state, prompt, guidance, sampler, steps, seed, batch, clip_scale], outputs)
    inpaint.click(on_inpaint, [state, editor, edit_prompt, guidance, sampler, steps, seed, batch], outputs)
    upsample.click(on_upsample, [state, up_temp, up_steps, up_sampler], outputs)
    paint_rect.click(on_rectangle, [state, editor, *rect], [state, status, editor])
    gallery.select(on_select_gallery, [state], [state, status] + shown)
    history.select(on_select_history, [state], [state, status] + shown)
  page.glide_jax_root = root
  page.glide_jax_inpaint_defaults = inp_d
  return page


def _latest_count(store: core.Store) -> int:
  """How many results the latest batch added (the gallery shows those)."""
  last = store.results[-1].batch
  return sum(1 for r in store.results if r.batch is last)


def _start_status(models: core.Models) -> str:
  off = [f"{b}: {models.reason(b)}" for b in ("generate", "inpaint", "upsample") if models.reason(b)]
  return "ready" + (" (" + "; ".join(off) + ")" if off else "")


def launch(page, host: str = "127.0.0.1", port: int | None = None, block: bool = True):
  """Serves the page on host:port (no share link, no analytics, system fonts); returns (app, url)."""
  app, url, _ = page.queue(default_concurrency_limit=1).launch(
      server_name=host, server_port=port, share=False, prevent_thread_lock=not block, inbrowser=False,
      quiet=not block, allowed_paths=[str(page.glide_jax_root)], ssr_mode=False, theme=theme(), css=CSS,
      footer_links=[], show_error=False)
  return app, url
