"""SamplerSteps (samplers/sampler_steps.py): model calls placed in sampler steps from their order and the
sampler's step reports, on hand-written traces of ComfyUI samplers' call patterns (8 linear steps, all exact
binary fractions; ComfyUI sigma, 1 = noise). The host tests run the real samplers."""

import pytest
import torch

from lumina_turbo.samplers.guidance import step_position
from lumina_turbo.samplers.sampler_steps import SamplerSteps

SIGMAS = torch.linspace(1.0, 0.0, 9)
S = SIGMAS.tolist()  # 1, .875, ..., .125, 0


def report(i):
    return ("report", i)


def attribute(trace, **options):
    steps = SamplerSteps(SIGMAS, **options)
    owners = []
    for event in trace:
        if isinstance(event, tuple):
            steps.step_reported(event[1])
        else:
            owners.append(steps.step_of_call(torch.tensor([event, event])))
    return owners


def euler():
    return [e for i in range(8) for e in (S[i], report(i))]


def heun():  # predictor, report, corrector at the end point unless it is 0
    return [e for i in range(8) for e in (S[i], report(i), *([S[i + 1]] if S[i + 1] else []))]


def heunpp2():  # two look-aheads, one before the last step, none on it
    trace = []
    for i in range(8):
        trace += [S[i], report(i)]
        trace += [] if i == 7 else [S[7]] if i == 6 else [S[i + 1], S[i + 2]]
    return trace


def test_step_position_says_whether_the_call_is_a_step_start():
    assert step_position(0.75, SIGMAS) == (2, True)
    assert step_position(0.6875, SIGMAS) == (2, False)  # a midpoint
    assert step_position(0.75 * 1.01, SIGMAS) == (2, True)  # nudged up to the point
    assert step_position(1.2, SIGMAS) == (0, True)
    assert step_position(0.01, SIGMAS) == (7, False)


def test_one_call_per_step():
    assert attribute(euler()) == list(range(8))


def test_heun_corrector_belongs_to_the_step_it_corrects():
    assert attribute(heun(), calls_between_reports=2) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7]


def test_heun_pattern_is_learned_after_one_step():
    # without the known pattern the first corrector cannot be told from Euler's next call: counted with step 1
    assert attribute(heun()) == [0, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7]


def test_heunpp2_look_aheads_and_its_shorter_last_steps():
    expected = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 7]
    assert attribute(heunpp2(), calls_between_reports=3) == expected


def test_midpoint_stages_stay_in_their_step():
    trace = [e for i in range(8) for e in (S[i], report(i), (S[i] + S[i + 1]) / 2)]
    assert attribute(trace) == [i for i in range(8) for _ in range(2)]


def test_sub_step_nudged_up_to_the_next_point_stays_in_its_step():
    # an ancestral sub-step just above sigma_{i+1}: a step's first call sits exactly on its point
    trace = [e for i in range(7) for e in (S[i], report(i), S[i + 1] + 0.01)] + [S[7], report(7)]
    assert attribute(trace) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7]


def test_second_call_at_the_step_start_stays_in_its_step():
    # sa_solver_pece: the corrected state is evaluated again at sigma_i after the report (not on step 0)
    trace = [S[0], report(0)] + [e for i in range(1, 8) for e in (S[i], report(i), S[i])]
    assert attribute(trace) == [0] + [i for i in range(1, 8) for _ in range(2)]


def test_first_reports_after_several_calls():
    # UniPC evaluates sigma_0 and sigma_1 before it reports step 1
    trace = [S[0]] + [e for i in range(1, 8) for e in (S[i], report(i))]
    assert attribute(trace) == list(range(8))


@pytest.mark.parametrize("pattern", [None, 2])
def test_without_reports_the_sigma_decides(pattern):
    calls = [e for e in heun() if not isinstance(e, tuple)]
    assert attribute(calls, calls_between_reports=pattern) == [0] + [i for i in range(1, 8) for _ in range(2)]
