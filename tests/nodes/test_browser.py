"""The pack in the real ComfyUI frontend (headless Debian Chromium, real server, real frontend).

Node search, the sigma-curve preview on the schedule nodes, the live loss chart on the trainer, a
workflow queued from the UI, and a browser console free of errors from the pack. Screenshots go to
out/screenshots/ (with LT_UPDATE_IMAGES=1 to docs/images/, where the README shows them).
"""

import json

import pytest

from lumina_turbo.devtools.browser_harness import images_dir, pack_node_defs, wait_for
from lumina_turbo.devtools.build_workflows import WORKFLOWS
from lumina_turbo.devtools.harness import REPO

pytestmark = [pytest.mark.browser, pytest.mark.server]

SCHEDULE_NODES = ("LTAnchorScheduler", "LTSigmoidScheduler")


@pytest.fixture(scope="module")
def pack_nodes(comfy_server):
    return pack_node_defs(comfy_server)


def add_node(page, node_type: str, pos=(80, 80)) -> int:
    return page.evaluate(
        """([type, pos]) => {
             const app = window.comfyAPI.app.app;
             const node = window.LiteGraph.createNode(type);
             node.pos = pos;
             app.graph.add(node);
             app.canvas.setDirty(true, true);
             return node.id;
           }""",
        [node_type, list(pos)],
    )


def search_nodes(page, query: str, expect: str):
    """Double click the empty canvas (opens the node search box), type ``query``; returns the result
    options once one of them shows ``expect``."""
    box = page.locator("input[role=combobox][placeholder='Search Nodes...']")
    for _ in range(20):  # right after start-up the canvas may not take the first double click yet
        page.mouse.dblclick(700, 450)
        try:
            box.wait_for(state="visible", timeout=1000)
            break
        except Exception:
            continue
    box.fill(query)
    options = page.locator("[role=listbox] [role=option]")
    try:
        wait_for(lambda: expect in " ".join(options.all_inner_texts()), 8)
    except TimeoutError:
        raise AssertionError(
            f"searching {query!r} never listed {expect!r}: {options.all_inner_texts()[:5]}"
        ) from None
    return options


def close_search(page):
    page.keyboard.press("Escape")
    page.locator("input[role=combobox][placeholder='Search Nodes...']").wait_for(state="hidden", timeout=5000)


def test_pack_nodes_in_node_search(clean_page, pack_nodes):
    page = clean_page.page
    assert "LTModelLoader" in pack_nodes
    for node_id, spec in sorted(pack_nodes.items()):
        # By id: the search matches ids too, and display names with "+ (...)" confuse its fuzzy match.
        options = search_nodes(page, node_id, spec["display_name"])
        match = options.filter(has_text=spec["display_name"]).first
        assert "lumina_turbo" in match.inner_text(), f"{node_id}: result does not name the pack"
        if node_id == "LTModelLoader":
            clean_page.screenshot(
                images_dir("docs") / "node_search.png", clip={"x": 480, "y": 180, "width": 860, "height": 240}
            )
            match.click()  # adds the node where the search opened, as a user would
            page.locator("input[role=combobox][placeholder='Search Nodes...']").wait_for(
                state="hidden", timeout=5000
            )
            added = clean_page.evaluate("() => window.comfyAPI.app.app.graph.nodes.map((n) => n.type)")
            assert added == ["LTModelLoader"]
            clean_page.evaluate("() => window.comfyAPI.app.app.graph.clear()")
        else:
            close_search(page)


def _preview_state(page, node_id):
    return page.evaluate(
        """(id) => {
             const node = window.comfyAPI.app.app.graph.getNodeById(id);
             const el = node.ltSigmaPreview?.root;
             if (!el) return null;
             const line = el.querySelector('polyline[data-series=sigmas]');
             return {state: el.dataset.state, sigmas: JSON.parse(el.dataset.sigmas || '[]'),
                     points: line ? line.getAttribute('points').trim().split(/\\s+/).length : 0,
                     caption: el.innerText, visible: el.getBoundingClientRect().height > 50,
                     steps: node.widgets.find((w) => w.name === 'steps').value,
                     values: Object.fromEntries(node.widgets.filter((w) => w.options?.serialize !== false)
                                                 .map((w) => [w.name, w.value]))};
           }""",
        node_id,
    )


@pytest.mark.parametrize("node_type", SCHEDULE_NODES)
def test_sigma_preview_draws_and_follows_steps(clean_page, pack_nodes, comfy_server, node_type):
    assert node_type in pack_nodes, f"the pack does not register {node_type}"
    node_id = add_node(clean_page, node_type, (120, 120))
    clean_page.wait_for_previews()
    first = _preview_state(clean_page.page, node_id)
    assert first["state"] == "ok" and first["visible"], first
    # The drawn curve is the Python schedule: the route's answer for the node's own widget values.
    query = "&".join(f"{k}={v}" for k, v in first["values"].items())
    expected = comfy_server.get_json(f"/lumina_turbo/sigmas?node={node_type}&{query}")["sigmas"]
    assert first["sigmas"] == pytest.approx(expected, abs=1e-7)
    assert first["points"] == first["steps"] + 1 == len(first["sigmas"])

    clean_page.click_widget(node_id, "steps", "right")  # the steps widget's ▶ arrow in the canvas
    wait_for(
        lambda: _preview_state(clean_page.page, node_id)["points"] == first["steps"] + 2,
        10,
        message="the preview redrawn for steps + 1",
    )
    second = _preview_state(clean_page.page, node_id)
    assert second["steps"] == first["steps"] + 1
    assert len(second["sigmas"]) == second["steps"] + 1 and second["sigmas"] != first["sigmas"]
    assert second["sigmas"][0] == first["sigmas"][0] and second["sigmas"][-1] == 0.0
    clean_page.frame_nodes(margin=60)
    clean_page.screenshot(
        images_dir("docs") / f"{node_type}_preview.png", clip=clean_page.graph_screen_box(margin=24)
    )


def test_sigma_preview_follows_values_set_by_code_and_says_why_it_cannot_draw(clean_page, pack_nodes):
    """A value set by another extension or a script (no widget callback) is picked up on the next
    redraw; denoise 0 (an empty schedule) and a value the route refuses are shown as messages."""
    assert "LTAnchorScheduler" in pack_nodes
    node_id = add_node(clean_page, "LTAnchorScheduler", (120, 120))
    clean_page.wait_for_previews()

    def set_widget(name, value):
        clean_page.evaluate(
            """([id, name, value]) => {
                 const app = window.comfyAPI.app.app;
                 app.graph.getNodeById(id).widgets.find((w) => w.name === name).value = value;
                 app.canvas.setDirty(true, true);
               }""",
            [node_id, name, value],
        )

    set_widget("shift", 6.0)
    wait_for(
        lambda: "shift 6" in _preview_state(clean_page.page, node_id)["caption"], 10, message="shift 6 drawn"
    )
    set_widget("denoise", 0.0)
    wait_for(lambda: _preview_state(clean_page.page, node_id)["state"] == "error", 10, message="error state")
    assert "empty schedule" in _preview_state(clean_page.page, node_id)["caption"]
    set_widget("denoise", 1.0)
    set_widget("steps", 5000)  # above the preview's 1000 steps: the route's own message is shown
    wait_for(
        lambda: "at most 1000" in _preview_state(clean_page.page, node_id)["caption"], 10, message="message"
    )
    set_widget("steps", 8)
    wait_for(lambda: _preview_state(clean_page.page, node_id)["state"] == "ok", 10, message="drawn again")
    assert len(_preview_state(clean_page.page, node_id)["sigmas"]) == 9


def test_sigmoid_preview_takes_the_shift_of_an_upstream_model_sampling_node(clean_page, pack_nodes):
    """LTSigmoidScheduler applies its model's shift; before a run the preview reads it from a
    ModelSamplingAuraFlow node upstream (and says unshifted when nothing upstream tells)."""
    from lumina_turbo.samplers.schedules import sigmoid_sigmas

    assert "LTSigmoidScheduler" in pack_nodes
    ids = clean_page.evaluate(
        """() => {
             const app = window.comfyAPI.app.app;
             const add = (type, pos) => { const n = window.LiteGraph.createNode(type); n.pos = pos; app.graph.add(n); return n; };
             const loader = add('LTModelLoader', [40, 120]);
             const sampling = add('ModelSamplingAuraFlow', [400, 120]);
             const schedule = add('LTSigmoidScheduler', [720, 120]);
             loader.connect(0, sampling, 0);
             sampling.widgets.find((w) => w.name === 'shift').value = 3;
             app.canvas.setDirty(true, true);
             return [loader.id, sampling.id, schedule.id];
           }"""
    )
    loader, sampling, schedule = ids
    clean_page.wait_for_previews()
    unlinked = _preview_state(clean_page.page, schedule)
    assert "no model" in unlinked["caption"]
    assert unlinked["sigmas"] == pytest.approx(sigmoid_sigmas(unlinked["steps"]).tolist(), abs=1e-7)

    clean_page.evaluate(
        "([a, b]) => { const g = window.comfyAPI.app.app.graph; g.getNodeById(a).connect(0, g.getNodeById(b), 0);"
        " window.comfyAPI.app.app.canvas.setDirty(true, true); }",
        [sampling, schedule],
    )
    wait_for(
        lambda: "ModelSamplingAuraFlow" in _preview_state(clean_page.page, schedule)["caption"],
        10,
        message="the preview using the upstream shift",
    )
    clean_page.wait_for_previews()
    shifted = _preview_state(clean_page.page, schedule)
    assert shifted["sigmas"] == pytest.approx(sigmoid_sigmas(shifted["steps"], shift=3.0).tolist(), abs=1e-7)
    clean_page.frame_nodes(margin=60)
    clean_page.screenshot(
        images_dir("docs") / "sigmoid_preview_model_shift.png", clip=clean_page.graph_screen_box(margin=24)
    )


def _run_from_ui(clean_page, timeout: float) -> dict:
    """Press the Run button; returns the execution_success event's detail."""
    clean_page.evaluate("""() => {
        window.__ltProbe.done = null;
        if (!window.__ltProbe.listening) {
          window.__ltProbe.listening = true;
          const api = window.comfyAPI.api.api;
          api.addEventListener('execution_success', (e) => { window.__ltProbe.done = e.detail; });
          api.addEventListener('execution_error', (e) => { window.__ltProbe.done = {error: e.detail}; });
        }
    }""")
    clean_page.page.locator("[data-testid=queue-button]").first.click()
    done = wait_for(
        lambda: clean_page.evaluate("() => window.__ltProbe.done"), timeout, 0.5, message="execution end"
    )
    assert "error" not in done, done
    return done


def test_workflow_queued_from_ui_completes(clean_page, comfy_server):
    """Open the basic template from the template browser, press Run, wait for the saved image."""
    page = clean_page.page
    clean_page.evaluate(
        "() => window.comfyAPI.app.app.extensionManager.command.execute('Comfy.BrowseTemplates')"
    )
    search = page.get_by_placeholder("Search")
    search.first.wait_for(timeout=15_000)
    search.first.fill("zimage_t2i_basic")
    card = page.locator("[data-testid^=template-workflow-]", has_text="zimage_t2i_basic").first
    card.wait_for(timeout=15_000)
    card.click()
    wait_for(
        lambda: clean_page.evaluate("() => window.comfyAPI.app.app.graph.nodes.length") == 7,
        15,
        message="the template loaded",
    )
    assert clean_page.evaluate("() => window.__ltProbe.missing") == []
    done = _run_from_ui(clean_page, 240)
    entry = comfy_server.get_json(f"/history/{done['prompt_id']}")[done["prompt_id"]]
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert len(images) == 1 and images[0]["filename"].startswith("zimage_t2i_basic")
    assert comfy_server.view(images[0])[:8] == b"\x89PNG\r\n\x1a\n"
    # The queued prompt is the template's API twin (same nodes and values).
    twin = json.loads((REPO / "example_workflows" / "api" / "zimage_t2i_basic.json").read_text())
    queued = entry["prompt"][2]
    assert {k: v["class_type"] for k, v in queued.items()} == {k: v["class_type"] for k, v in twin.items()}
    assert {k: v["inputs"] for k, v in queued.items()} == {k: v["inputs"] for k, v in twin.items()}


def test_loss_chart_follows_training(clean_page, pack_nodes):
    """Queue the lora_training template from the UI; the trainer's chart gets every optimizer step."""
    assert "LTLoraTrainer" in pack_nodes
    workflow = json.loads((WORKFLOWS / "lora_training.json").read_text())
    twin = json.loads((WORKFLOWS / "api" / "lora_training.json").read_text())
    trainer_key = next(k for k, v in twin.items() if v["class_type"] == "LTLoraTrainer")
    total = twin[trainer_key]["inputs"]["steps"]
    assert clean_page.load_workflow(workflow, "lora_training") == []
    clean_page.evaluate("""() => {
        window.__ltProbe.progress = [];
        window.comfyAPI.api.api.addEventListener(
          'lumina_turbo.train_progress', (e) => window.__ltProbe.progress.push(e.detail));
    }""")
    _run_from_ui(clean_page, 300)
    events = clean_page.evaluate("() => window.__ltProbe.progress")
    assert [e["step"] for e in events] == list(range(1, total + 1))
    assert all(str(e["node"]) == trainer_key for e in events)
    chart = clean_page.evaluate(
        """(id) => {
             const el = window.comfyAPI.app.app.graph.getNodeById(id).ltLossChart.root;
             const line = el.querySelector('polyline[data-series=loss]');
             return {steps: Number(el.dataset.steps), last: Number(el.dataset.lastLoss), caption: el.innerText,
                     points: line.getAttribute('points').trim().split(/\\s+/).length};
           }""",
        int(trainer_key),
    )
    assert chart["steps"] == chart["points"] == total
    assert chart["last"] == pytest.approx(events[-1]["loss"])
    assert f"step {total}/{total}" in chart["caption"]
    # At 100 % zoom, the lower part of the (tall) trainer node: the chart and the progress text.
    clip = clean_page.evaluate(
        """(id) => {
             const app = window.comfyAPI.app.app;
             const node = app.graph.getNodeById(id);
             app.canvas.ds.scale = 1;
             app.canvas.ds.offset = [500 - node.pos[0], 760 - node.pos[1] - node.size[1]];
             app.canvas.setDirty(true, true);
             return node.id;
           }""",
        int(trainer_key),
    )
    clean_page.page.wait_for_timeout(400)
    box = clean_page.node_screen_box(int(trainer_key))
    bottom = box["y"] + box["height"]
    clip = {"x": box["x"] - 10, "y": bottom - 300, "width": box["width"] + 20, "height": 330}
    clean_page.screenshot(images_dir("docs") / "loss_chart.png", clip=clip)


def test_browser_console_has_no_pack_errors(comfy_page):
    """Over the whole session so far: nothing from the pack in the console, no failed pack request."""
    assert comfy_page.pack_errors() == []
    loaded = comfy_page.evaluate("() => window.comfyAPI.app.app.extensions.map((e) => e.name)")
    assert {"LuminaTurbo.SigmaPreview", "LuminaTurbo.LossChart"} <= set(loaded)
