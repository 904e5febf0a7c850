"""Node help pages: web/docs/<NodeId>.md for every node the pack registers, each naming its node and
every input; the frontend shows them in its node help panel (selection toolbox -> info)."""

import pytest

from lumina_turbo.devtools.browser_harness import images_dir
from lumina_turbo.devtools.harness import REPO

DOCS = REPO / "web" / "docs"


def _inputs(node_class) -> list[str]:
    spec = node_class.INPUT_TYPES()
    return [name for section in ("required", "optional") for name in spec.get(section, {})]


def test_every_node_has_a_help_page(comfy_host):
    import nodes

    assert "LTModelLoader" in comfy_host.node_ids
    for node_id in comfy_host.node_ids:
        page = DOCS / f"{node_id}.md"
        assert page.is_file(), f"{node_id} has no help page {page.relative_to(REPO)}"
        text = page.read_text()
        heading = text.splitlines()[0]
        assert heading.startswith("# ") and f"`{node_id}`" in heading, f"{page.name}: first line {heading!r}"
        undocumented = [
            n for n in _inputs(nodes.NODE_CLASS_MAPPINGS[node_id]) if n.lower() not in text.lower()
        ]
        assert not undocumented, f"{page.name} does not mention the inputs {undocumented}"


def test_help_pages_are_outside_the_javascript_path():
    # ComfyUI imports every .js under WEB_DIRECTORY ("./web"); the docs are fetched, never imported.
    assert not list(DOCS.rglob("*.js"))


@pytest.mark.browser
@pytest.mark.server
def test_frontend_shows_the_help_pages(clean_page, comfy_server):
    from lumina_turbo.devtools.browser_harness import pack_node_defs

    page = clean_page.page
    for node_id in sorted(pack_node_defs(comfy_server)):
        clean_page.evaluate(
            """(type) => {
                 const app = window.comfyAPI.app.app;
                 app.graph.clear();
                 const node = window.LiteGraph.createNode(type);
                 node.pos = [520, 260];
                 app.graph.add(node);
                 app.canvas.selectNode(node);
                 app.canvas.setDirty(true, true);
               }""",
            node_id,
        )
        try:
            page.locator("[data-testid=info-button]").first.click(
                timeout=5000
            )  # the selection toolbox's info button
        except Exception:
            page.screenshot(path=str(REPO / "out" / "debug_docs.png"))
            raise AssertionError(f"dialogs open: {clean_page.dialogs()}") from None
        help_text = page.locator(".node-help-content .markdown-content")
        help_text.wait_for(timeout=10_000)
        page.wait_for_function(
            "(id) => document.querySelector('.node-help-content .markdown-content')?.innerText.includes(id)",
            arg=node_id,
            timeout=10_000,
        )
        # The page's own text, not the fallback the panel shows when the .md cannot be fetched.
        second_paragraph = (DOCS / f"{node_id}.md").read_text().split("\n\n")[1].split()[:3]
        assert " ".join(second_paragraph).replace("*", "").replace("`", "")[:12] in help_text.inner_text(), (
            node_id
        )
        if node_id == "LTAnchorScheduler":
            clean_page.screenshot(
                images_dir("docs") / "help_page.png", clip={"x": 0, "y": 0, "width": 900, "height": 640}
            )
    page.keyboard.press("Escape")
