"""HTTP routes for the pack's web extension (web/js/): no nodes here, only routes.

``GET /lumina_turbo/sigmas?node=<NodeId>&steps=8&shift=3&...`` answers the sigmas the schedule node
would produce for those widget values, computed by the same functions in samplers/schedules.py that
the nodes call, so the sigma-curve preview never re-implements the math in JavaScript.
Answers ``{"node", "params", "sigmas"}`` (ComfyUI sigma: 1 = noise, 0 = data). Values the schedule
refuses (a user still typing) answer 200 with ``{"node", "error": "..."}`` naming the parameter: the
preview shows the message, and the browser logs no failed request; an unknown node answers 404.
Work per request is bounded (at most MAX_PREVIEW_STEPS steps, a schedule of at most
``schedules.MAX_TOTAL_STEPS`` after denoise) and runs in a worker thread, not on the event loop.

:func:`register_server_routes` is called from the pack's ``comfy_entrypoint`` (ComfyUI loads custom
nodes before the server adds its routes); in-process hosts without an HTTP server simply get none.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Callable, Mapping

from ..samplers import schedules

# node id -> the schedule function its preview shows (the one the node itself calls).
PREVIEW_SCHEDULES: dict[str, Callable] = {
    "LTAnchorScheduler": schedules.anchor_sigmas,
    "LTSigmoidScheduler": schedules.sigmoid_sigmas,
}
MAX_PREVIEW_STEPS = 1000


class PreviewError(ValueError):
    """A query the preview cannot answer; the message names the parameter and what was expected."""


class UnknownNode(PreviewError):
    """The node has no preview."""


def _parse(name: str, text: str, annotation) -> object:
    kind = str(annotation)
    try:
        if "int" in kind and "float" not in kind:
            return int(text)
        if "float" in kind:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
    except ValueError:
        raise PreviewError(f"{name} must be a number, got {text!r}") from None
    return text


def preview_sigmas(node: str, query: Mapping[str, str]) -> dict:
    """The sigmas ``node`` computes for the widget values in ``query`` (strings, as sent by the page).

    Only parameters of the node's schedule function are used (others, such as seed widgets the page
    may send along, are ignored); each is parsed by the function's annotation and checked by the
    function itself. Raises PreviewError with a message naming the parameter.
    """
    function = PREVIEW_SCHEDULES.get(node)
    if function is None:
        raise UnknownNode(f"node must be one of {sorted(PREVIEW_SCHEDULES)}, got {node!r}")
    params = {}
    for name, parameter in inspect.signature(function).parameters.items():
        text = query.get(name)
        if text is None or text == "":
            if parameter.default is inspect.Parameter.empty:
                raise PreviewError(f"{name} is required for {node}")
            continue
        params[name] = _parse(name, text, parameter.annotation)
    if isinstance(params.get("steps"), int) and params["steps"] > MAX_PREVIEW_STEPS:
        raise PreviewError(
            f"steps must be at most {MAX_PREVIEW_STEPS} for the preview, got {params['steps']}"
        )
    try:
        sigmas = function(**params)
    except ValueError as err:
        raise PreviewError(str(err)) from None
    return {"node": node, "params": params, "sigmas": [float(s) for s in sigmas]}


def register(routes) -> None:
    from aiohttp import web

    @routes.get("/lumina_turbo/sigmas")
    async def sigmas_route(request):
        query = dict(request.query)
        node = query.pop("node", "")
        try:
            # bounded (MAX_PREVIEW_STEPS, schedules.MAX_TOTAL_STEPS) and off the event loop besides:
            # no request can stall the server's other requests and websockets
            answer = await asyncio.get_running_loop().run_in_executor(None, preview_sigmas, node, query)
            return web.json_response(answer)
        except UnknownNode as err:
            return web.json_response({"node": node, "error": str(err)}, status=404)
        except PreviewError as err:
            return web.json_response({"node": node, "error": str(err)})


def register_server_routes() -> bool:
    """Add the routes to the running ComfyUI server, once; False where there is none (in-process hosts)."""
    global _registered
    if _registered:
        return True
    try:
        from server import PromptServer
    except ImportError:
        return False
    routes = getattr(getattr(PromptServer, "instance", None), "routes", None)
    if routes is None:
        return False
    register(routes)
    _registered = True
    return True


_registered = False
