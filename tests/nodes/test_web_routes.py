"""GET /lumina_turbo/sigmas, the route behind the sigma-curve preview: the same numbers as the
schedule functions (and so as the nodes), parameters parsed by name, errors that name the input."""

import pytest
import torch

from lumina_turbo.samplers.schedules import anchor_sigmas, sigmoid_sigmas


@pytest.fixture(scope="module")
def routes():
    from lumina_turbo.devtools.comfy_host import bootstrap

    bootstrap()
    from lumina_turbo.nodes import routes as web_routes

    return web_routes


@pytest.mark.parametrize(
    ("node", "query", "expected"),
    [
        ("LTAnchorScheduler", {"steps": "8", "shift": "3", "convention": "zimage"}, anchor_sigmas(8, 3.0)),
        (
            "LTAnchorScheduler",
            {"steps": "6", "shift": "6", "convention": "diffusers", "denoise": "0.5"},
            anchor_sigmas(6, 6.0, convention="diffusers", denoise=0.5),
        ),
        (
            "LTSigmoidScheduler",
            {"steps": "10", "slope": "4", "center": "0.4"},
            sigmoid_sigmas(10, slope=4.0, center=0.4),
        ),
        ("LTSigmoidScheduler", {"steps": "5", "shift": "3", "seed": "1"}, sigmoid_sigmas(5, shift=3.0)),
    ],
)
def test_preview_is_the_schedule_function(routes, node, query, expected):
    answer = routes.preview_sigmas(node, query)
    assert answer["sigmas"] == expected.tolist()
    assert "seed" not in answer["params"]  # parameters the schedule does not take are ignored


def test_the_anchor_values_of_zimage_turbo(routes):
    sigmas = routes.preview_sigmas("LTAnchorScheduler", {"steps": "8", "shift": "3"})["sigmas"]
    reference = [1, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3, 0]
    assert torch.allclose(torch.tensor(sigmas), torch.tensor(reference, dtype=torch.float32), atol=1e-4)


@pytest.mark.parametrize(
    ("node", "query", "message"),
    [
        ("LTNope", {"steps": "8"}, "node must be one of"),
        ("LTAnchorScheduler", {"shift": "3"}, "steps is required"),
        ("LTAnchorScheduler", {"steps": "eight", "shift": "3"}, "steps must be a number, got 'eight'"),
        ("LTAnchorScheduler", {"steps": "0", "shift": "3"}, "steps must be a whole number >= 1"),
        ("LTAnchorScheduler", {"steps": "8", "shift": "nan"}, "shift must be a number"),
        ("LTAnchorScheduler", {"steps": "8", "shift": "-1"}, "shift must be a finite number > 0"),
        ("LTAnchorScheduler", {"steps": "8", "shift": "3", "convention": "x"}, "convention must be one of"),
        ("LTSigmoidScheduler", {"steps": "5000"}, "steps must be at most 1000"),
        ("LTSigmoidScheduler", {"steps": "8", "center": "2"}, "center must be a step fraction"),
    ],
)
def test_bad_queries_are_refused_by_name(routes, node, query, message):
    with pytest.raises(routes.PreviewError, match=message):
        routes.preview_sigmas(node, query)


@pytest.mark.server
def test_route_on_the_real_server(comfy_server):
    answer = comfy_server.get_json(
        "/lumina_turbo/sigmas?node=LTAnchorScheduler&steps=4&shift=3&convention=zimage"
    )
    assert answer["sigmas"] == anchor_sigmas(4, 3.0).tolist()
    assert answer["params"] == {"steps": 4, "shift": 3.0, "convention": "zimage"}
    # The frontend calls it through api.fetchApi, i.e. with ComfyUI's /api prefix.
    assert (
        comfy_server.get_json("/api/lumina_turbo/sigmas?node=LTSigmoidScheduler&steps=3")["sigmas"][0] == 1.0
    )
    # A value the schedule refuses is the preview's message, not a failed request (nothing logged in
    # the browser while the user is typing); an unknown node is a 404.
    refused = comfy_server.get_json("/lumina_turbo/sigmas?node=LTAnchorScheduler&steps=0&shift=3")
    assert "sigmas" not in refused and "steps must be a whole number" in refused["error"]
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as error:
        comfy_server.get_json("/lumina_turbo/sigmas?node=KSampler&steps=8")
    assert error.value.code == 404
    assert "node must be one of" in error.value.read().decode()
