"""Test harness: the pack inside a real ComfyUI, in-process and as a server.

* ``comfy_host`` — ComfyUI's own node loader loads the pack (``nodes.load_custom_node`` on the
  ``.comfyui/custom_nodes/lumina_turbo`` link made by ``make setup``); API-format prompts are
  validated by ``execution.validate_prompt`` and run by the real ``execution.PromptExecutor``.
* ``comfy_server`` — ``main.py --cpu`` on a free loopback port, started and stopped by the fixture;
  prompts go through ``POST /prompt``, results come from ``/history`` and ``/view``.
* ``tiny_models`` — the tiny random models of both families, installed once under
  ``.comfyui/models`` (the same files ``make run`` and ``make demo`` use).

Prompts are built with ComfyUI's own ``comfy_execution.graph_utils.GraphBuilder``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from lumina_turbo.devtools.comfy_host import COMFY_DIR, REPO, bootstrap

PACK_LINK = COMFY_DIR / "custom_nodes" / "lumina_turbo"
MODELS_DIR = COMFY_DIR / "models"
TRAINING_ROOTS_ENV = "LUMINA_TURBO_TRAINING_ROOTS"  # nodes/paths.py: the server-side dataset opt-in


def run_coroutine(coro):
    """``asyncio.run``, also where this thread already has a running loop (playwright's sync API
    keeps one while a browser is open): then the coroutine runs on a loop of its own in a worker
    thread, as ComfyUI's prompt worker thread runs the executor."""
    try:
        asyncio.get_running_loop()
        loop_running = True
    except RuntimeError:
        loop_running = False
    # Outside the except block: errors raised by the coroutine do not chain to this RuntimeError.
    if not loop_running:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


class PromptFailed(AssertionError):
    """A prompt that ComfyUI refused or that failed while executing; carries ComfyUI's own report."""

    def __init__(self, message: str, details):
        super().__init__(f"{message}: {json.dumps(details, indent=1, default=str)[:4000]}")
        self.details = details


class RecordingServer:
    """Stands in for PromptServer.instance: records every message the executor and nodes send."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


class ComfyHost:
    """ComfyUI in this process with the pack loaded by ComfyUI's own custom-node loader."""

    def __init__(self, output_dir: Path):
        bootstrap()
        import execution
        import folder_paths
        import nodes
        import server

        folder_paths.set_output_directory(str(output_dir))
        self.output_dir = output_dir
        self.server = RecordingServer()
        server.PromptServer.instance = self.server
        run_coroutine(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        builtin = set(nodes.NODE_CLASS_MAPPINGS)
        if not run_coroutine(nodes.load_custom_node(str(PACK_LINK), ignore=builtin)):
            raise RuntimeError(f"ComfyUI failed to import the pack from {PACK_LINK} (see the log above)")
        self.node_ids = sorted(set(nodes.NODE_CLASS_MAPPINGS) - builtin)
        self.executor = execution.PromptExecutor(
            self.server, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0}
        )

    def validate(self, prompt: dict):
        import execution

        return run_coroutine(execution.validate_prompt(str(uuid.uuid4()), prompt, None))

    def run(self, prompt: dict) -> dict:
        """Validate and execute an API-format prompt; returns the history outputs per node id."""
        valid, error, outputs, node_errors = self.validate(prompt)
        if not valid:
            raise PromptFailed("ComfyUI refused the prompt", {"error": error, "node_errors": node_errors})
        self.server.messages.clear()
        prompt_id = str(uuid.uuid4())
        # execute_async: PromptExecutor.execute is asyncio.run(execute_async(...)).
        run_coroutine(self.executor.execute_async(prompt, prompt_id, {}, outputs))
        if not self.executor.success:
            errors = [data for event, data in self.executor.status_messages if event == "execution_error"]
            raise PromptFailed("the prompt failed while executing", errors)
        return self.executor.history_result["outputs"]

    def latents(self, outputs: dict) -> dict:
        """Every SaveLatent result of a run, keyed by its filename prefix up to the first ``_``."""
        import safetensors.torch

        found = {}
        for node_output in outputs.values():
            for item in node_output.get("latents", []):
                path = self.output_dir / item.get("subfolder", "") / item["filename"]
                found[item["filename"].split("_")[0]] = safetensors.torch.load_file(str(path))[
                    "latent_tensor"
                ]
        return found

    def latent(self, outputs: dict):
        """The one SaveLatent result of a run."""
        (latent,) = self.latents(outputs).values()
        return latent

    def image_paths(self, outputs: dict) -> list[Path]:
        paths = []
        for node_output in outputs.values():
            for image in node_output.get("images", []):
                paths.append(self.output_dir / image.get("subfolder", "") / image["filename"])
        return paths


class ComfyServer:
    """``main.py --cpu`` on a free loopback port."""

    def __init__(self, output_dir: Path, log_path: Path, env: dict | None = None):
        """``env``: extra environment of the server; LUMINA_TURBO_TRAINING_ROOTS only from here (the
        in-process host's opt-in for pytest's temp folders does not leak into the server)."""
        self.port = _free_port()
        self.output_dir = Path(output_dir)
        self.user_dir = tempfile.mkdtemp(prefix="comfy-user-")
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            str(COMFY_DIR / "main.py"),
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-api-nodes",
            "--output-directory",
            str(output_dir),
            "--database-url",
            "sqlite:///:memory:",
            "--disable-auto-launch",
            # Settings and saved workflows of tests stay out of .comfyui/user (the `make run` user's).
            "--user-directory",
            self.user_dir,
        ]
        self.log_path = log_path
        self._log = open(log_path, "w")
        environment = {k: v for k, v in os.environ.items() if k != TRAINING_ROOTS_ENV}
        environment.update({"PYTHONUNBUFFERED": "1", **(env or {})})
        self.proc = subprocess.Popen(
            cmd, cwd=str(COMFY_DIR), stdout=self._log, stderr=subprocess.STDOUT, env=environment
        )
        self._wait_ready(timeout=180)

    def _wait_ready(self, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get_json("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer on {self.url} within {timeout}s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get_json(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return response.read()

    def post_json(self, path: str, payload: dict):
        request = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """POST /prompt, poll /history until it finishes; returns the history entry."""
        status, body = self.post_json("/prompt", {"prompt": prompt, "client_id": "lumina-turbo-tests"})
        if status != 200:
            raise PromptFailed(f"POST /prompt answered {status}", body)
        prompt_id = body["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") != "success":
                    raise PromptFailed("the prompt failed on the server", entry["status"])
                return entry
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s")

    def view(self, image: dict) -> bytes:
        query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
        return self.get_bytes(f"/view?{query}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self.user_dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def install_tiny_models() -> Path:
    from .tiny_models import install

    return install(MODELS_DIR)


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    """The ComfyUI models/ folder holding the tiny-random-* models of both families."""
    return install_tiny_models()


@pytest.fixture(scope="session")
def comfy_host(tmp_path_factory, tiny_models) -> ComfyHost:
    # Tests train from datasets in their tmp_path, outside input/: allowed the way a server owner
    # allows extra training folders (the server fixture runs without it).
    os.environ[TRAINING_ROOTS_ENV] = str(tmp_path_factory.getbasetemp().resolve())
    return ComfyHost(tmp_path_factory.mktemp("comfy-output"))


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, tiny_models):
    out = tmp_path_factory.mktemp("server-output")
    server = ComfyServer(out, out / "comfyui.log")
    try:
        yield server
    finally:
        server.stop()


def graph():
    """ComfyUI's own builder for API-format prompts."""
    bootstrap()
    from comfy_execution.graph_utils import GraphBuilder

    return GraphBuilder()


__all__ = ["REPO", "ComfyHost", "ComfyServer", "PromptFailed", "graph"]
