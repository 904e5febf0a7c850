"""The real ComfyUI frontend in headless Debian Chromium, driven by playwright.

* ``comfy_page`` (session fixture) — one Chromium and one page on the ``comfy_server`` fixture's
  server, with a fresh profile, first-run dialogs off, console messages and failed requests recorded.
* ``ComfyPage`` — also used by devtools/build_workflows.py for template thumbnails.

Chromium is Debian's (``/usr/bin/chromium``, installed by ``make setup`` as root); playwright's own
browser downloads are never used. Without it the browser tests fail, naming the missing binary
(``LT_SKIP_BROWSER=1`` skips them knowingly).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("LT_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 900}
# Settings for a quiet, deterministic page: no template browser on first start, no minimap or canvas
# info in screenshots, every load-time warning enabled (the profile and user folder are fresh, so
# nothing is restored from an earlier session).
TEST_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.Workflow.Persist": True,  # the first workflow opens at start (readiness signal)
    "Comfy.Workflow.ShowMissingNodesWarning": True,
    "Comfy.Workflow.ShowMissingModelsWarning": True,
    "Comfy.Validation.Workflows": True,
}
# A message is the pack's when it names the pack: its URLs (/extensions/lumina_turbo/..., /lumina_turbo/...,
# stack frames of web/js/) or its extension names (LuminaTurbo.*).
PACK_MARKERS = ("lumina_turbo", "LuminaTurbo")
_LOCALE_DOC_PROBE = re.compile(r"/extensions/lumina_turbo/docs/[^/]+/[A-Za-z-]+\.md$")

# Installed once per page: records what the frontend reports after every graph load.
_PROBE = """
(() => {
  if (window.__ltProbe) return;
  window.__ltProbe = {missing: null, loads: 0};
  window.comfyAPI.app.app.registerExtension({
    name: "LuminaTurboTests.probe",
    afterConfigureGraph(missing) {
      window.__ltProbe.missing = (missing || []).map((m) => (typeof m === "string" ? m : m.type));
      window.__ltProbe.loads += 1;
    },
  });
})()
"""


def chromium_missing_reason() -> str | None:
    if not CHROMIUM.exists():
        return (
            f"browser tests need {CHROMIUM} (Debian package 'chromium'; `make setup` installs it "
            "when run as root)"
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "browser tests need the 'playwright' package (requirements-dev.txt; run `make setup`)"
    return None


class ComfyPage:
    """One page of the real frontend; records console messages, page errors and failed requests."""

    def __init__(self, base_url: str, profile_dir: Path):
        from playwright.sync_api import sync_playwright

        self.base_url = base_url
        self._playwright = sync_playwright().start()
        self.context = self._playwright.chromium.launch_persistent_context(
            str(profile_dir),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_FLAGS,
            headless=True,
            viewport=VIEWPORT,
            device_scale_factor=1,
        )
        self.context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
        self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
        self.console: list[dict] = []
        self.page.on("console", self._on_console)
        self.page.on(
            "pageerror",
            lambda err: self.console.append(
                {"type": "pageerror", "text": f"{err}\n{getattr(err, 'stack', '')}", "url": ""}
            ),
        )
        self.page.on(
            "response",
            lambda r: (
                r.status >= 400
                and self.console.append({"type": "http", "text": f"{r.status} {r.url}", "url": r.url})
            ),
        )
        self.open()

    def _on_console(self, message):
        location = message.location or {}
        self.console.append({"type": message.type, "text": message.text, "url": location.get("url", "")})

    def open(self):
        post_settings(self.base_url)
        self.page.goto(self.base_url + "/")
        # Ready for input once the first workflow is open (the canvas ignores clicks before that).
        self.page.wait_for_function(
            "window.comfyAPI?.app?.app?.graph && window.comfyAPI.app.app.extensionManager?.workflow?.activeWorkflow",
            timeout=90_000,
        )
        self.page.evaluate(_PROBE)
        # Our extensions are loaded once the frontend registered them.
        self.page.wait_for_function(
            "window.comfyAPI.app.app.extensions.some((e) => e.name.startsWith('LuminaTurbo.'))",
            timeout=30_000,
        )
        self.page.wait_for_timeout(300)

    def evaluate(self, script: str, arg=None):
        return self.page.evaluate(script, arg)

    def pack_errors(self, since: int = 0) -> list[dict]:
        """Console errors and warnings, page errors and failed requests that name the pack.

        Not counted: the help panel's probe for a translated page (docs/<NodeId>/<locale>.md), which
        the frontend always tries before the untranslated docs/<NodeId>.md the pack ships."""
        return [
            m
            for m in self.console[since:]
            if m["type"] in ("error", "warning", "pageerror", "http")
            and any(marker in m["text"] + m["url"] for marker in PACK_MARKERS)
            and not _LOCALE_DOC_PROBE.search(m["url"])
        ]

    def load_workflow(self, workflow: dict, name: str = "test") -> list[str]:
        """app.loadGraphData exactly as the template browser calls it; returns the missing node types."""
        return self.evaluate(
            """async ([workflow, name]) => {
                 window.__ltProbe.missing = null;
                 await window.comfyAPI.app.app.loadGraphData(workflow, true, true, name);
                 return window.__ltProbe.missing;
               }""",
            [workflow, name],
        )

    def graph_to_prompt(self) -> dict:
        return self.evaluate("async () => (await window.comfyAPI.app.app.graphToPrompt()).output")

    def dialogs(self) -> list[str]:
        """Texts of open dialogs and toasts (missing-node warnings, validation toasts, errors)."""
        return self.evaluate(
            """() => [...document.querySelectorAll('.p-dialog, .p-toast-message')]
                     .map((el) => el.innerText.trim()).filter(Boolean)"""
        )

    def close_dialogs(self):
        """Close every dialog (through the frontend's dialog store, as its close buttons do) and toast."""
        self.page.keyboard.press("Escape")
        self.evaluate(
            """() => {
                 // The frontend's dialog store (Pinia), reached through the workspace store's Pinia.
                 const dialogs = window.comfyAPI.app.app.extensionManager._p._s.get('dialog');
                 for (let i = 0; i < 10 && dialogs?.dialogStack.length; i++) dialogs.closeDialog();
                 document.querySelectorAll('.p-toast-message .p-toast-close-button').forEach((b) => b.click());
               }"""
        )
        self.page.wait_for_function("() => !document.querySelector('.p-dialog-mask')", timeout=5000)

    def set_focus_mode(self, on: bool):
        """Focus mode hides menus and sidebars: the canvas alone, for screenshots."""
        self.evaluate("(on) => { window.comfyAPI.app.app.extensionManager.focusMode = on; }", on)
        self.page.wait_for_timeout(300)

    def wait_for_previews(self, timeout_ms: int = 15_000):
        """Wait until every sigma preview on the page has drawn (or shown its error)."""
        self.page.wait_for_function(
            """() => [...document.querySelectorAll('.lt-sigma-preview')]
                     .every((el) => ['ok', 'error'].includes(el.dataset.state))""",
            timeout=timeout_ms,
        )

    def frame_nodes(self, margin: int = 40):
        """Zoom and pan so every node fits the canvas (what 'Fit view' does)."""
        self.evaluate(
            """(margin) => {
                 const app = window.comfyAPI.app.app;
                 const nodes = app.graph.nodes;
                 if (!nodes.length) return;
                 let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
                 for (const n of nodes) {
                   const b = n.getBounding();
                   x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]);
                   x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]);
                 }
                 const el = app.canvas.canvas;
                 const w = el.clientWidth, h = el.clientHeight;
                 const scale = Math.min(1.2, (w - 2 * margin) / (x1 - x0), (h - 2 * margin) / (y1 - y0));
                 app.canvas.ds.scale = scale;
                 app.canvas.ds.offset = [(w / scale - (x1 - x0)) / 2 - x0, (h / scale - (y1 - y0)) / 2 - y0];
                 app.canvas.setDirty(true, true);
               }""",
            margin,
        )
        self.page.wait_for_timeout(300)

    def screenshot_graph(self, path: Path, max_width: int = 1600):
        """The whole graph at full detail: a window as large as the graph (LiteGraph drops text and
        widgets when zoomed out), focus mode (no menus), then scaled down to ``max_width``."""
        from PIL import Image

        self.set_focus_mode(True)
        self.wait_for_previews()
        _, _, width, height = self.graph_bounds()
        self.page.set_viewport_size(
            {
                "width": int(min(max(width + 120, 1000), 3200)),
                "height": int(min(max(height + 160, 700), 2000)),
            }
        )
        try:
            self.frame_nodes(margin=40)
            self.screenshot(path, clip=self.graph_screen_box())
        finally:
            self.page.set_viewport_size(VIEWPORT)
            self.set_focus_mode(False)
        image = Image.open(path)
        if image.width > max_width:
            image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
            image.save(path)
        return path

    def graph_bounds(self) -> list[float]:
        """[x, y, width, height] of all nodes in graph space (title bars included)."""
        return self.evaluate(
            """() => {
                 let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
                 for (const n of window.comfyAPI.app.app.graph.nodes) {
                   const b = n.getBounding();
                   x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]);
                   x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]);
                 }
                 return [x0, y0, x1 - x0, y1 - y0];
               }"""
        )

    def node_screen_box(self, node_id) -> dict:
        """The node's rectangle on the page (title bar included), in CSS pixels."""
        return self.evaluate(
            """(id) => {
                 const app = window.comfyAPI.app.app;
                 const node = app.graph.getNodeById(id);
                 const b = node.getBounding();
                 const rect = app.canvas.canvas.getBoundingClientRect();
                 const [x, y] = app.canvas.ds.convertOffsetToCanvas([b[0], b[1]]);
                 const s = app.canvas.ds.scale;
                 return {x: rect.left + x, y: rect.top + y, width: b[2] * s, height: b[3] * s};
               }""",
            node_id,
        )

    def canvas_to_page(self, point) -> tuple[float, float]:
        """A graph-space point -> page pixels (where a mouse click lands on it)."""
        return tuple(
            self.evaluate(
                """([x, y]) => {
                 const app = window.comfyAPI.app.app;
                 const rect = app.canvas.canvas.getBoundingClientRect();
                 const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([x, y]);
                 return [rect.left + cx, rect.top + cy];
               }""",
                list(point),
            )
        )

    def click_widget(self, node_id, widget_name: str, where: str = "right"):
        """Click a widget in the canvas as a user would: "right"/"left" are a number widget's arrows."""
        x, y, width, height = self.evaluate(
            """([id, name]) => {
                 const node = window.comfyAPI.app.app.graph.getNodeById(id);
                 const widget = node.widgets.find((w) => w.name === name);
                 const h = widget.computedHeight ?? 20;
                 return [node.pos[0], node.pos[1] + widget.y, node.size[0], h];
               }""",
            [node_id, widget_name],
        )
        offset = {"right": width - 22, "left": 22, "middle": width / 2}[where]
        self.page.mouse.click(*self.canvas_to_page((x + offset, y + height / 2)))
        self.page.wait_for_timeout(100)

    def graph_screen_box(self, margin: int = 16) -> dict:
        """The rectangle on the page that holds every node (plus ``margin``), clipped to the window."""
        boxes = [
            self.node_screen_box(node_id)
            for node_id in self.evaluate("() => window.comfyAPI.app.app.graph.nodes.map((n) => n.id)")
        ]
        x0 = max(0, min(b["x"] for b in boxes) - margin)
        y0 = max(0, min(b["y"] for b in boxes) - margin)
        viewport = self.page.viewport_size
        x1 = min(viewport["width"], max(b["x"] + b["width"] for b in boxes) + margin)
        y1 = min(viewport["height"], max(b["y"] + b["height"] for b in boxes) + margin)
        return {"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0}

    def screenshot(self, path: Path, clip: dict | None = None, **kwargs):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.wait_for_timeout(200)
        if clip:
            clip = {k: round(v) for k, v in clip.items()}
        self.page.screenshot(path=str(path), clip=clip, **kwargs)

    def close(self):
        try:
            self.context.close()
        finally:
            self._playwright.stop()


def post_settings(base_url: str, settings: dict = TEST_SETTINGS):
    """Store frontend settings on the server (POST /settings answers an empty body)."""
    request = urllib.request.Request(
        base_url + "/settings",
        data=json.dumps(settings).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200, response.status


def wait_for(predicate, timeout: float, interval: float = 0.2, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{message} not reached within {timeout}s")


def images_dir(kind: str) -> Path:
    """Where screenshots go: out/screenshots/ always; with LT_UPDATE_IMAGES=1 the committed
    docs/images/ (README) — so `make test` never rewrites tracked files."""
    from lumina_turbo.devtools.harness import REPO

    if os.environ.get("LT_UPDATE_IMAGES") == "1" and kind == "docs":
        return REPO / "docs" / "images"
    return REPO / "out" / "screenshots"


@pytest.fixture(scope="session")
def comfy_page(comfy_server):
    reason = chromium_missing_reason()
    if reason:
        # A missing browser must not pass silently: `make test` is the verdict on the UI too.
        if os.environ.get("LT_SKIP_BROWSER") == "1":
            pytest.skip(reason)
        pytest.fail(f"{reason}; or set LT_SKIP_BROWSER=1 to skip the browser tests knowingly", pytrace=False)
    profile = Path(tempfile.mkdtemp(prefix="lt-chromium-"))
    page = ComfyPage(comfy_server.url, profile)
    try:
        yield page
    finally:
        page.close()
        shutil.rmtree(profile, ignore_errors=True)


def pack_node_defs(server) -> dict:
    """object_info of the nodes the pack registered, as the frontend receives it."""
    info = server.get_json("/object_info")
    return {
        name: spec
        for name, spec in info.items()
        if spec.get("python_module", "").split(".")[:2] == ["custom_nodes", "lumina_turbo"]
    }


@pytest.fixture
def clean_page(comfy_page):
    """comfy_page with an empty graph and no dialog open; fails the test if the pack logged an error."""
    comfy_page.close_dialogs()
    comfy_page.set_focus_mode(False)
    comfy_page.evaluate(
        "() => { const app = window.comfyAPI.app.app; app.graph.clear();"
        " app.canvas.ds.scale = 1; app.canvas.ds.offset = [0, 0]; }"
    )
    seen = len(comfy_page.console)
    yield comfy_page
    new_errors = comfy_page.pack_errors(since=seen)
    assert not new_errors, f"the pack logged errors in the browser: {new_errors}"
