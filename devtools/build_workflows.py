"""Build the UI-format templates from their API-format twins.

For every ``example_workflows/api/<name>.json`` (API format: what ``POST /prompt`` takes) this writes
``example_workflows/<name>.json`` in the format the frontend's *Save* writes (nodes with id, type,
pos, size, inputs, outputs, widgets_values in the widget order of ``/object_info``, links, groups,
version 0.4) and, where Debian's Chromium is available, ``example_workflows/<name>.jpg``: a
screenshot of the template loaded in the real frontend (the thumbnail of the template browser).

Widget order and socket types come from the live ``/object_info`` of a real ComfyUI server with the
pack loaded (``--url`` of a running one, else one is started on a free port). Nodes are laid out left
to right by their depth in the graph. Output is deterministic: running it again changes nothing;
thumbnails are re-taken only when missing or when their template changed (``--thumbnails all``
re-takes every one).

    .venv/bin/python -m lumina_turbo.devtools.build_workflows [--url http://127.0.0.1:8188] [--thumbnails missing|all|none]
    .venv/bin/python -m lumina_turbo.devtools.build_workflows --check   # exit 1 if a template is missing or stale
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "example_workflows"
API_DIR = WORKFLOWS / "api"

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = ("seed", "noise_seed")  # the frontend gives these a control widget even unflagged
# Nodes whose web extension adds a chart widget below the others (web/js/); room for it in the layout.
CHART_NODES = {"LTSigmoidScheduler": 160, "LTAnchorScheduler": 160, "LTLoraTrainer": 160}
COLUMN_GAP, ROW_GAP, ORIGIN = 70, 40, (40, 60)
THUMBNAIL_SIZE = (640, 400)


class WorkflowError(ValueError):
    """An API twin that cannot be turned into a UI workflow; names the file, node and input."""


def _input_specs(info: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, optional) in the frontend's order: input_order's required, then optional."""
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    specs = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            specs.append((name, info["input"][section][name], section == "optional"))
    return specs


def _spec_type(spec) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def _is_widget(spec) -> bool:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return _spec_type(spec) in WIDGET_TYPES and not options.get("forceInput")


def _extra_widget_values(name: str, spec, where: str) -> list:
    """Values of the widgets the frontend adds after this one (saved in widgets_values too)."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    for upload in ("image_upload", "audio_upload", "video_upload", "animated_image_upload"):
        if options.get(upload):
            raise WorkflowError(
                f"{where}: input {name!r} has an upload widget, which this script does not lay out yet"
            )
    control = options.get("control_after_generate", name in SEED_NAMES and _spec_type(spec) == "INT")
    if not control:
        return []
    if _spec_type(spec) != "INT":
        raise WorkflowError(
            f"{where}: control_after_generate on a {_spec_type(spec)} input ({name!r}) is not supported"
        )
    return ["fixed"]  # the template's seed as written, every run: what the API twin does


def _text_width(chars: int, per_char: float) -> int:
    return int(per_char * chars + 0.999)


def _node_size(
    node_type: str,
    title: str,
    widgets: list[tuple[str, list, object]],
    sockets: list[str],
    outputs: list[str],
) -> list[int]:
    """At least the size the frontend computes on load (it only ever grows a node), so that the
    left-to-right layout does not overlap: title and widget texts measured with generous widths."""

    def is_multiline(spec):
        return _spec_type(spec) == "STRING" and (spec[1] if len(spec) > 1 else {}).get("multiline")

    multiline = sum(1 for _, spec, _ in widgets if is_multiline(spec))
    rows = len(widgets) - multiline + sum(len(_extra_widget_values(n, s, node_type)) for n, s, _ in widgets)
    slot_rows = max(len(sockets), len(outputs), 1)
    height = 14 + 20 * slot_rows + 24 * rows + 110 * multiline + CHART_NODES.get(node_type, 0)
    widths = [320, _text_width(len(title), 7.5) + 30]
    widths += [_text_width(len(n) + len(str(v)), 8) + 140 for n, s, v in widgets if not is_multiline(s)]
    if sockets and outputs:
        widths.append(_text_width(max(map(len, sockets)) + max(map(len, outputs)), 8) + 60)
    if multiline:
        widths.append(400)
    return [max(widths), height]


def _ids(prompt: dict) -> dict[str, int]:
    """API ids -> UI ids: kept when they are all whole numbers, else numbered in file order."""
    if all(str(key).isdigit() for key in prompt):
        return {key: int(key) for key in prompt}
    return {key: index for index, key in enumerate(prompt, start=1)}


def _is_link(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
    )


def api_to_ui(prompt: dict, object_info: dict, name: str) -> dict:
    """The UI-format workflow of an API-format prompt (see the module docstring)."""
    ids = _ids(prompt)
    nodes, links = {}, []
    for key, entry in prompt.items():
        where = f"{name}: node {key} ({entry.get('class_type')})"
        info = object_info.get(entry.get("class_type"))
        if info is None:
            raise WorkflowError(f"{where}: the server has no node {entry.get('class_type')!r}")
        specs = _input_specs(info)
        unknown = set(entry["inputs"]) - {spec_name for spec_name, _, _ in specs}
        if unknown:
            raise WorkflowError(f"{where}: inputs {sorted(unknown)} are not inputs of this node")
        sockets = [(n, s) for n, s, _ in specs if not _is_widget(s)]
        widgets = [(n, s) for n, s, _ in specs if _is_widget(s)]
        inputs = [{"localized_name": n, "name": n, "type": _spec_type(s), "link": None} for n, s in sockets]
        inputs += [
            {"localized_name": n, "name": n, "type": _spec_type(s), "widget": {"name": n}, "link": None}
            for n, s in widgets
        ]
        widgets_values, sized = [], []
        for widget_name, spec in widgets:
            value = entry["inputs"].get(widget_name)
            if value is None or _is_link(value):  # linked widgets keep a value too: their default
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                value = options.get("default", spec[0][0] if isinstance(spec[0], list) and spec[0] else None)
                if value is None and _spec_type(spec) == "COMBO":
                    value = (options.get("options") or [None])[0]
            widgets_values.append(value)
            widgets_values.extend(_extra_widget_values(widget_name, spec, where))
            sized.append((widget_name, spec, value))
        outputs = [
            {"localized_name": out_name, "name": out_name, "type": out_type, "links": []}
            for out_type, out_name in zip(info["output"], info["output_name"], strict=True)
        ]
        title = entry.get("_meta", {}).get("title")
        shown_title = title or info.get("display_name") or entry["class_type"]
        node = {
            "id": ids[key],
            "type": entry["class_type"],
            "pos": [0, 0],
            "size": _node_size(
                entry["class_type"], shown_title, sized, [n for n, _ in sockets], [o["name"] for o in outputs]
            ),
            "flags": {},
            "order": 0,
            "mode": 0,
            "inputs": inputs,
            "outputs": outputs,
            "properties": {"Node name for S&R": entry["class_type"]},
            "widgets_values": widgets_values,
        }
        if title and title not in (info.get("display_name"), entry["class_type"]):
            node["title"] = title
        nodes[key] = node

    for key, entry in prompt.items():
        for input_name, value in entry["inputs"].items():
            if not _is_link(value):
                continue
            source_key, slot = value
            if source_key not in nodes:
                raise WorkflowError(
                    f"{name}: node {key} input {input_name!r} links to missing node {source_key!r}"
                )
            source, target = nodes[source_key], nodes[key]
            if slot >= len(source["outputs"]):
                raise WorkflowError(
                    f"{name}: node {key} input {input_name!r} links to output {slot} of node "
                    f"{source_key}, which has {len(source['outputs'])} outputs"
                )
            target_slot = next(
                i for i, slot_def in enumerate(target["inputs"]) if slot_def["name"] == input_name
            )
            link_id = len(links) + 1
            link_type = source["outputs"][slot]["type"]
            links.append([link_id, source["id"], slot, target["id"], target_slot, link_type])
            target["inputs"][target_slot]["link"] = link_id
            source["outputs"][slot]["links"].append(link_id)
            source["outputs"][slot]["slot_index"] = slot

    _layout(prompt, nodes)
    for node in nodes.values():
        for output in node["outputs"]:
            if not output["links"]:
                output["links"] = None  # what the frontend writes for unconnected outputs
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"lumina-turbo/example_workflows/{name}")),
        "revision": 0,
        "last_node_id": max(node["id"] for node in nodes.values()),
        "last_link_id": len(links),
        "nodes": sorted(nodes.values(), key=lambda node: node["id"]),
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"workflowRendererVersion": "LG"},
        "version": 0.4,
    }


def _layout(prompt: dict, nodes: dict):
    """Left to right: each node one column before its earliest consumer (sources as late as their
    consumers allow, so links stay short); within a column, nodes in the order of their consumers."""
    parents = {key: [v[0] for v in entry["inputs"].values() if _is_link(v)] for key, entry in prompt.items()}
    children: dict[str, list[str]] = {key: [] for key in prompt}
    for key, sources in parents.items():
        for source in sources:
            children[source].append(key)
    earliest: dict[str, int] = {}

    def earliest_column(key, seen=()):
        if key in seen:
            raise WorkflowError(f"node {key} is part of a cycle")
        if key not in earliest:
            earliest[key] = 1 + max((earliest_column(p, (*seen, key)) for p in parents[key]), default=-1)
        return earliest[key]

    for key in prompt:
        earliest_column(key)
    column = dict(earliest)
    for key in sorted(prompt, key=lambda k: -earliest[k]):  # consumers before their sources
        if children[key]:
            column[key] = max(earliest[key], min(column[c] for c in children[key]) - 1)
    columns: dict[int, list[str]] = {}
    for key in prompt:
        columns.setdefault(column[key], []).append(key)
    row: dict[str, float] = {}
    for index in sorted(columns, reverse=True):

        def rank(key):
            consumers = [row[c] for c in children[key] if c in row]
            return (sum(consumers) / len(consumers) if consumers else float("inf"), nodes[key]["id"])

        for position, key in enumerate(sorted(columns[index], key=rank)):
            row[key] = position
        columns[index].sort(key=lambda k: row[k])
    x = ORIGIN[0]
    for index in sorted(columns):
        y = ORIGIN[1]
        for key in columns[index]:
            nodes[key]["pos"] = [x, y]
            y += nodes[key]["size"][1] + ROW_GAP
        x += max(nodes[key]["size"][0] for key in columns[index]) + COLUMN_GAP
    for order, key in enumerate(sorted(prompt, key=lambda k: (column[k], row[k]))):
        nodes[key]["order"] = order


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


def api_twins() -> list[Path]:
    return sorted(API_DIR.glob("*.json"))


def build_all(object_info: dict) -> dict[str, str]:
    """{template name: UI json text} for every API twin."""
    return {
        path.stem: dumps(api_to_ui(json.loads(path.read_text()), object_info, path.stem))
        for path in api_twins()
    }


def fetch_object_info(url: str) -> dict:
    with urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=60) as response:
        return json.loads(response.read())


def _fit(image, size):
    """Scale ``image`` into ``size`` keeping its aspect; the rest is filled with the canvas colour."""
    from PIL import Image

    scale = min(size[0] / image.width, size[1] / image.height)
    scaled = image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS
    )
    framed = Image.new("RGB", size, image.getpixel((1, 1)))
    framed.paste(scaled, ((size[0] - scaled.width) // 2, (size[1] - scaled.height) // 2))
    return framed


def take_thumbnails(url: str, names: list[str]):
    """Load each template in the real frontend (headless Chromium) and save a .jpg of the graph."""
    from PIL import Image

    from lumina_turbo.devtools.browser_harness import ComfyPage

    with tempfile.TemporaryDirectory(prefix="lt-chromium-") as profile:
        page = ComfyPage(url, Path(profile))
        try:
            for name in names:
                workflow = json.loads((WORKFLOWS / f"{name}.json").read_text())
                missing = page.load_workflow(workflow, name)
                if missing:
                    raise WorkflowError(f"{name}: the frontend reports missing nodes {missing}")
                png = page.screenshot_graph(Path(profile) / f"{name}.png", max_width=THUMBNAIL_SIZE[0] * 2)
                _fit(Image.open(png).convert("RGB"), THUMBNAIL_SIZE).save(
                    WORKFLOWS / f"{name}.jpg", quality=85, optimize=True
                )
                print(f"thumbnail: example_workflows/{name}.jpg")
        finally:
            page.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running ComfyUI with the pack (default: start one)")
    parser.add_argument("--check", action="store_true", help="only check that the templates are up to date")
    parser.add_argument("--thumbnails", choices=("missing", "all", "none"), default="missing")
    args = parser.parse_args(argv)

    server = None
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            from lumina_turbo.devtools.harness import ComfyServer, install_tiny_models

            install_tiny_models()
            out = Path(tempfile.mkdtemp(prefix="lt-build-workflows-"))
            server = ComfyServer(out, out / "comfyui.log")
            url = server.url
        built = build_all(fetch_object_info(url))
        stale = [
            name
            for name, text in built.items()
            if not (WORKFLOWS / f"{name}.json").exists() or (WORKFLOWS / f"{name}.json").read_text() != text
        ]
        orphans = [p for p in WORKFLOWS.glob("*.json") if p.stem not in built]
        if args.check:
            for name in stale:
                print(f"stale or missing: example_workflows/{name}.json")
            for path in orphans:
                print(f"no API twin for: example_workflows/{path.name}")
            return 1 if stale or orphans else 0
        for name in stale:
            (WORKFLOWS / f"{name}.json").write_text(built[name])
            print(f"wrote example_workflows/{name}.json")
        for path in orphans:
            path.unlink()
            path.with_suffix(".jpg").unlink(missing_ok=True)
            print(f"removed {path.name} (its API twin is gone)")
        if args.thumbnails != "none":
            from lumina_turbo.devtools.browser_harness import chromium_missing_reason

            wanted = [
                name
                for name in built
                if args.thumbnails == "all" or name in stale or not (WORKFLOWS / f"{name}.jpg").exists()
            ]
            reason = chromium_missing_reason()
            if wanted and reason:
                print(f"thumbnails not taken: {reason}")
                return 1
            if wanted:
                take_thumbnails(url, wanted)
        return 0
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
