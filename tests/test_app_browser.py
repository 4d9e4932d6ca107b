"""`glide-jax app` in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright)
against the page served on 127.0.0.1 with tiny random bundles. Generate, select, paint a mask with
mouse events on the editor's canvas, Inpaint (the known pixels byte-identical), Upsample, download
the PNG and read its metadata, the bad-input messages and the disabled buttons; no request leaves
127.0.0.1. GLIDE_JAX_SCREENSHOT=path saves a screenshot of the page (docs/images/app.png)."""
import os
import pathlib
import shutil
import socket
import time

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = os.environ.get("GLIDE_JAX_SCREENSHOT")
SIZE = 16 if SCREENSHOT else 8  # the screenshot shows a little more than 8 x 8 pixels
TIMEOUT_MS = 180_000

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")
pytest.importorskip("gradio", reason="gradio is not installed (the app extra)")
if not os.path.exists(CHROMIUM):
  pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install -y chromium; "
              "launch/test.sh does as root)", allow_module_level=True)

from app_support import make_bundles

from glide_jax.app import core, ui

pytestmark = pytest.mark.slow


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  """The full page (base, inpaint, upsample bundles) and a base-only page, each on a free port."""
  root = tmp_path_factory.mktemp("app_browser")
  b = make_bundles(root / "bundles", SIZE)
  pages = {"full": ui.build(core.load_models(b["base"], b["upsample"], b["inpaint"]), root / "full"),
           "base": ui.build(core.load_models(b["base"], upsample_bundle=b["base"]), root / "base")}
  urls = {name: ui.launch(page, "127.0.0.1", _free_port(), block=False)[1] for name, page in pages.items()}
  yield urls, {name: page.glide_jax_root for name, page in pages.items()}
  for page in pages.values():
    page.close()


@pytest.fixture(scope="module")
def browser():
  with playwright_api.sync_playwright() as p:
    b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
    yield b
    b.close()


def _status(pg) -> str:
  return pg.locator("#status textarea").input_value()


def _wait_status(pg, prefix: str, before: str | None = None) -> str:
  """Waits until the status line starts with `prefix` (and differs from `before`)."""
  pg.wait_for_function("([p, b]) => { const v = document.querySelector('#status textarea').value;"
                       " return v.startsWith(p) && v !== b; }", arg=[prefix, before], timeout=TIMEOUT_MS)
  return _status(pg)


def _click(pg, selector: str, prefix: str) -> str:
  """Clicks and waits for the answer (every answer changes the status line: it ends in a count)."""
  before = _status(pg)
  pg.click(selector)
  pg.wait_for_function("b => document.querySelector('#status textarea').value !== b", arg=before, timeout=TIMEOUT_MS)
  status = _status(pg)
  assert status.startswith(prefix), status
  return status


def _paint(pg, rows: list[float], x_from: float, x_to: float):
  """Brush strokes across the editor's canvas, in fractions of the shown image's box around its centre."""
  pg.wait_for_timeout(1500)  # the editor draws a newly selected image a moment after the status says so
  brush = pg.locator("#editor button[aria-label=Brush]")
  # clicking the active brush opens its options over the canvas, which then takes the strokes
  if "highlight" not in (brush.get_attribute("class") or ""):
    brush.click()
  pg.wait_for_timeout(300)
  box = pg.locator("#editor canvas").first.bounding_box()
  cx, cy, half = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, 120
  for r in rows:
    y = cy + r * half
    pg.mouse.move(cx + x_from * half, y)
    pg.mouse.down()
    pg.mouse.move(cx + x_to * half, y, steps=8)
    pg.mouse.up()
  pg.wait_for_timeout(300)


def _session_dir(root: pathlib.Path) -> pathlib.Path:
  dirs = [d for d in root.iterdir() if d.is_dir() and (d / "0001.png").exists()]
  assert len(dirs) == 1, dirs
  return dirs[0]


def test_generate_inpaint_upsample_download(served, browser, tmp_path):
  urls, roots = served
  requests = []
  pg = browser.new_page(viewport={"width": 1280, "height": 1500})
  pg.on("request", lambda r: requests.append(r.url))
  pg.goto(urls["full"])
  pg.wait_for_selector("#generate")
  assert _status(pg) == "ready"

  # bad input first: an empty prompt, nothing to upsample
  assert "prompt is empty" in _click(pg, "#generate", "the prompt is empty")
  assert "select an image first" in _click(pg, "#upsample", "select an image first")

  pg.fill("#prompt textarea", "a red circle")
  pg.locator("#batch input").fill("2")
  pg.locator("#steps textarea").fill("4")
  pg.locator("#seed input").fill("5")
  t0 = time.time()
  status = _click(pg, "#generate", "generated 2 image(s)")
  generate_s = time.time() - t0
  assert "'a red circle'" in status
  assert pg.locator("#gallery .thumbnail-item").count() == 2
  pg.locator("#gallery .thumbnail-item").nth(1).click()
  assert _wait_status(pg, "selected #2").startswith("selected #2")
  session = _session_dir(roots["full"])
  source = np.asarray(Image.open(session / "0002.png"))
  assert "--seed 5" in pg.locator("#command textarea").input_value()

  # Inpaint with nothing painted is refused; then paint the upper left and inpaint
  pg.fill("#edit-prompt textarea", "a blue square")
  assert "keeps every pixel" in _click(pg, "#inpaint", "the mask keeps every pixel")
  for attempt in range(3):
    # strokes made while the editor is still drawing a new image are lost (headless Chromium on a
    # loaded machine); the page then says nothing was painted, and the test paints again
    _paint(pg, [-0.8, -0.6, -0.4, -0.2], -0.8, -0.1)
    t0 = time.time()
    status = _click(pg, "#inpaint", "")
    inpaint_s = time.time() - t0
    if not status.startswith("the mask keeps every pixel"):
      break
  assert status.startswith("inpainted 2 image(s) #3-#4"), (attempt, status)
  mask = np.asarray(Image.open(next(session.glob("batch*-inpaint-mask.png")))) > 127
  assert 0 < (~mask).sum() and not (~mask)[SIZE // 2 + 1:].any() and not (~mask)[:, SIZE // 2 + 1:].any(), mask
  for rid in (3, 4):
    out = np.asarray(Image.open(session / f"{rid:04d}.png"))
    np.testing.assert_array_equal(out[mask], source[mask])  # the known pixels' bytes
    assert not np.array_equal(out[~mask], source[~mask])
  assert f"{mask.mean():.0%} of the pixels kept" in status

  # the inpainted result (selected) is downloaded: its PNG carries the settings and the command
  with pg.expect_download() as info:
    pg.locator("#download a").first.click()
  saved = tmp_path / "download.png"
  info.value.save_as(saved)
  meta = core.read_png_metadata(saved)
  assert (meta["mode"], meta["prompt"], meta["seed"], meta["id"], meta["parent"]) == ("inpaint", "a blue square", 5, 3, 2)
  assert meta["command"] == pg.locator("#command textarea").input_value()
  assert '"a blue square"' in pg.locator("#metadata").inner_text()

  # edit the result again (select #4 in the history), then upsample the selection
  pg.locator("#history .thumbnail-item").nth(3).click()
  assert _wait_status(pg, "selected #4").startswith("selected #4")
  t0 = time.time()
  status = _click(pg, "#upsample", "upsampled #4")
  upsample_s = time.time() - t0
  assert f"to {2 * SIZE}x{2 * SIZE} px as #5" in status
  big = np.asarray(Image.open(session / "0005.png"))
  assert big.shape == (2 * SIZE, 2 * SIZE, 3)
  assert pg.locator("#history .thumbnail-item").count() == 5
  assert "already an upsampled image" in _click(pg, "#upsample", "#5 is already an upsampled image")

  # the rectangle tool: a box of model pixels, refused with a message when empty, then inpainted
  pg.locator("#history .thumbnail-item").nth(1).click()
  assert _wait_status(pg, "selected #2").startswith("selected #2")
  pg.wait_for_timeout(1500)  # as for the brush: let the editor draw the selected image
  box = {"left": SIZE // 2, "top": 1, "right": SIZE // 2, "bottom": SIZE - 2}
  for name, v in box.items():
    pg.locator(f"#rect-{name} input").fill(str(v))
  assert "need 0 <= left < right" in _click(pg, "#paint-rectangle", f"rectangle left {SIZE // 2}, right {SIZE // 2}")
  pg.locator("#rect-right input").fill(str(SIZE))
  assert "caption it and press Inpaint" in _click(pg, "#paint-rectangle", "painted the rectangle")
  pg.fill("#edit-prompt textarea", "a green triangle")
  status = _click(pg, "#inpaint", "inpainted 2 image(s) #6-#7")
  rect_mask = np.asarray(Image.open(max(session.glob("batch*-inpaint-mask.png")))) > 127
  expected = np.ones((SIZE, SIZE), bool)
  expected[1:SIZE - 2, SIZE // 2:] = False
  np.testing.assert_array_equal(rect_mask, expected)
  for rid in (6, 7):
    out = np.asarray(Image.open(session / f"{rid:04d}.png"))
    np.testing.assert_array_equal(out[expected], source[expected])

  if SCREENSHOT:
    pg.locator("#history .thumbnail-item").nth(2).click()
    _wait_status(pg, "selected #3")
    _paint(pg, [0.3, 0.5], 0.2, 0.7)
    pathlib.Path(SCREENSHOT).parent.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=SCREENSHOT, full_page=True)
    with Image.open(SCREENSHOT) as shot:  # 128 colours keep the docs' PNG small
      shot.convert("RGB").quantize(colors=128).save(SCREENSHOT, optimize=True)
  hosts = {r.split("/")[2] for r in requests if r.startswith("http")}
  assert hosts == {urls["full"].split("/")[2]}, hosts
  print(f"browser: generate {generate_s:.1f} s, inpaint {inpaint_s:.1f} s, upsample {upsample_s:.1f} s")
  pg.close()


def test_buttons_without_their_bundle_are_disabled_with_the_reason(served, browser):
  urls, _ = served
  pg = browser.new_page()
  pg.goto(urls["base"])
  pg.wait_for_selector("#generate")
  assert pg.locator("#generate").is_enabled()
  assert pg.locator("#inpaint").is_disabled() and pg.locator("#upsample").is_disabled()
  assert "start the app with --inpaint-bundle" in pg.locator("#inpaint-note").inner_text()
  assert "holds a text2im model, not an upsampler" in pg.locator("#upsample-note").inner_text()
  assert "inpaint: no inpainting bundle" in _status(pg)
  pg.close()
