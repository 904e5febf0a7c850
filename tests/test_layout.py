"""The layout's promises, checked from the import graph and by importing the pack as a user has it."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

from lumina_turbo.devtools.comfy_host import COMFY_DIR, REPO

COMFY_MODULES = {
    "comfy",
    "comfy_api",
    "comfy_extras",
    "comfy_execution",
    "folder_paths",
    "server",
    "execution",
}
# Each folder of the installed pack and the folders it may import ("comfy": ComfyUI itself).
ALLOWED = {
    "samplers": set(),
    "losses": {"samplers"},
    "loading": {"comfy"},
    "lora": {"comfy", "loading"},
    "patches": {"comfy", "samplers", "loading"},
    "training": {"comfy", "loading", "lora", "losses", "samplers"},
    "nodes": {"comfy", "loading", "lora", "patches", "training", "losses", "samplers"},
}
DEVELOPMENT = {"devtools", "tests", "benchmarks", "scripts"}


def imported_folders(path: Path, folder: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = ([folder] if node.level == 1 else []) + (node.module.split(".") if node.module else [])
            names = [alias.name for alias in node.names] if not parts else [parts[0]]
            found.update(names)
        elif isinstance(node, ast.ImportFrom | ast.Import):
            modules = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            for module in modules:
                top = (module or "").split(".")
                if top[0] == "lumina_turbo" and len(top) > 1:
                    found.add(top[1])
                elif top[0] in COMFY_MODULES or (top[0] == "nodes" and folder != "nodes"):
                    found.add("comfy")
                elif top[0] == "nodes" and not node.level:
                    found.add("comfy")  # ComfyUI's nodes.py, imported absolutely
    found.discard(folder)
    return found


def test_imports_point_down_and_never_into_the_development_folders():
    wrong = []
    for folder, allowed in ALLOWED.items():
        for path in sorted((REPO / folder).glob("*.py")):
            extra = imported_folders(path, folder) - allowed
            if extra & (DEVELOPMENT | set(ALLOWED) | {"comfy"}):
                wrong.append(f"{path.relative_to(REPO)} imports {sorted(extra)}")
    top = imported_folders(REPO / "__init__.py", "")
    assert not top & DEVELOPMENT, top
    assert not wrong, "\n".join(wrong)


def test_every_top_level_folder_is_known():
    folders = {p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    known = set(ALLOWED) | DEVELOPMENT | {"web", "example_workflows", "docs", "configs", "out"}
    assert folders <= known, f"unexplained top-level folders: {sorted(folders - known)}"


def test_a_user_install_without_diffusers_imports_every_node():
    """ComfyUI's own loader imports the pack with diffusers made unimportable, as in a user's ComfyUI."""
    script = textwrap.dedent(
        f"""
        import asyncio, importlib.abc, sys
        class NoDiffusers(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "diffusers" or name.startswith("diffusers."):
                    raise ImportError("diffusers is not installed in this ComfyUI")
        sys.meta_path.insert(0, NoDiffusers())
        sys.path.insert(0, {str(COMFY_DIR)!r})
        import utils.extra_config
        from comfy.cli_args import args
        args.cpu = True
        import comfy.model_management
        import nodes
        before = set(nodes.NODE_CLASS_MAPPINGS)
        ok = asyncio.run(nodes.load_custom_node({str(COMFY_DIR / "custom_nodes" / "lumina_turbo")!r}, ignore=before))
        ours = sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)
        leaked = sorted(m for m in sys.modules if m.startswith(("diffusers", "lumina_turbo.devtools")))
        print("RESULT", ok, ",".join(ours), ",".join(leaked) or "-")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert line is not None, done.stderr[-3000:]
    _, ok, ours, leaked = line.split(" ")
    assert ok == "True" and leaked == "-", line
    expected = {
        "LTCFGGuider", "LTCFGPatch", "LTSigmoidScheduler", "LTAnchorScheduler", "LTFlowMidpointSampler",
        "LTModelLoader", "LTLoraLoader", "LTContextDrop", "LTScaledRoPE", "LTDataset", "LTLoraTrainer",
        "LTSaveLora", "LTLoraConvert", "LTFitSampler",
    }  # fmt: skip
    assert expected <= set(ours.split(",")), ours
