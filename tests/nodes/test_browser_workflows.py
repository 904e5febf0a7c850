"""Every template in the real frontend: it loads with no missing-node warning and no validation
toast, its nodes do not overlap, the frontend's own UI -> API conversion (app.graphToPrompt) gives
back its API twin, and the template browser lists it with its thumbnail."""

import json

import pytest

from lumina_turbo.devtools.browser_harness import images_dir
from lumina_turbo.devtools.build_workflows import API_DIR, THUMBNAIL_SIZE, WORKFLOWS, _ids

pytestmark = [pytest.mark.browser, pytest.mark.server]

TEMPLATES = sorted(p.stem for p in API_DIR.glob("*.json"))


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get_json("/object_info")


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))
    return a == b


def _default(object_info, class_type, name):
    info = object_info[class_type]["input"]
    spec = {**info.get("required", {}), **info.get("optional", {})}[name]
    return spec[1].get("default") if len(spec) > 1 else None


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_loads_and_converts_back_to_its_api_twin(clean_page, object_info, name):
    workflow = json.loads((WORKFLOWS / f"{name}.json").read_text())
    twin = json.loads((API_DIR / f"{name}.json").read_text())
    assert clean_page.load_workflow(workflow, name) == [], "the frontend reports missing nodes"
    clean_page.page.wait_for_timeout(300)
    assert clean_page.dialogs() == [], "a warning dialog or toast appeared on load"

    overlaps = clean_page.evaluate(
        """() => {
             const nodes = window.comfyAPI.app.app.graph.nodes.map((n) => [n.id, n.getBounding()]);
             const hits = [];
             for (const [i, a] of nodes) for (const [j, b] of nodes)
               if (i < j && a[0] < b[0] + b[2] && b[0] < a[0] + a[2] && a[1] < b[1] + b[3] && b[1] < a[1] + a[3])
                 hits.push([i, j]);
             return hits;
           }"""
    )
    assert overlaps == [], f"nodes overlap after the frontend sized them: {overlaps}"

    queued = clean_page.graph_to_prompt()
    ids = {key: str(value) for key, value in _ids(twin).items()}
    assert sorted(queued) == sorted(ids.values())
    for key, entry in twin.items():
        got = queued[ids[key]]
        assert got["class_type"] == entry["class_type"], key
        for input_name, value in entry["inputs"].items():
            if isinstance(value, list):
                value = [ids[value[0]], value[1]]
            assert _same(got["inputs"].get(input_name), value), (
                key,
                input_name,
                got["inputs"].get(input_name),
                value,
            )
        for input_name in set(got["inputs"]) - set(entry["inputs"]):  # widgets the twin left at default
            assert _same(got["inputs"][input_name], _default(object_info, entry["class_type"], input_name)), (
                key,
                input_name,
            )
    if name in ("sigmoid_midpoint_few_step", "lora_training", "zimage_turbo_anchor"):
        clean_page.screenshot_graph(images_dir("docs") / f"template_{name}.png")


def test_template_browser_lists_every_template_with_its_thumbnail(clean_page):
    page = clean_page.page
    clean_page.evaluate(
        "() => window.comfyAPI.app.app.extensionManager.command.execute('Comfy.BrowseTemplates')"
    )
    page.get_by_placeholder("Search").first.wait_for(timeout=15_000)
    # The pack's own category under EXTENSIONS in the dialog's navigation.
    page.locator("[role=dialog]").get_by_text("lumina_turbo", exact=True).first.click()
    cards = page.locator("[data-testid^='template-workflow-']")
    cards.first.wait_for(timeout=15_000)
    shown = {
        c.removeprefix("template-workflow-")
        for c in clean_page.evaluate(
            "() => [...document.querySelectorAll(\"[data-testid^='template-workflow-']\")]"
            ".map((e) => e.dataset.testid)"
        )
    }
    assert shown == set(TEMPLATES)
    for name in TEMPLATES:
        card = page.locator(f"[data-testid='template-workflow-{name}']")
        card.scroll_into_view_if_needed(timeout=15_000)  # thumbnails load when their card is in view
        image = card.locator("img").first
        image.wait_for(timeout=10_000)
        image.evaluate("(img) => img.decode()")  # the fetched /workflow_templates/lumina_turbo/<name>.jpg
        assert image.evaluate("(img) => [img.naturalWidth, img.naturalHeight]") == list(THUMBNAIL_SIZE), name
    cards.first.scroll_into_view_if_needed()
    clean_page.screenshot(images_dir("docs") / "template_browser.png")
    page.keyboard.press("Escape")
