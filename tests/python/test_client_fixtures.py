"""Every PyTorch reference case of tests/fixtures/ through gradservice.Client against a real
gradserver: ComputeGradients' output, loss, gradients and running statistics, and Forward's
output and running statistics, each within tests/tolerance.h's kRelativeTolerance."""

import pathlib

import pytest

import gradservice as gs
from fixture_case import assert_close, find_cases, load_case

CASES = find_cases(pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures")


def test_every_fixture_directory_is_found():
    # A glob that matched nothing would pass every parametrized test below vacuously.
    assert len(CASES) >= 30, CASES


@pytest.mark.parametrize("directory", CASES, ids=[c.name for c in CASES])
def test_compute_gradients_matches_pytorch(client, tolerance, directory):
    case = load_case(directory)
    spec = case.spec
    result = client.compute_gradients(spec.network, case.params, case.input, case.objective,
                                      input_grad=spec.input_grad, param_grads=spec.param_grads)
    assert_close("output", result.output, case.expected_output, tolerance)
    if case.expected_loss is None:
        assert result.loss is None
    else:
        assert_close("loss", result.loss, case.expected_loss, tolerance)
    if case.expected_input_grad is None:
        assert result.input_grad is None
    else:
        assert_close("input_grad", result.input_grad, case.expected_input_grad, tolerance)
    assert sorted(result.param_grads) == sorted(case.expected_param_grads)
    for name, expected in case.expected_param_grads.items():
        assert_close(f"{name} grad", result.param_grads[name], expected, tolerance)
    assert sorted(result.running_stats) == sorted(case.expected_running_stats)
    for name, expected in case.expected_running_stats.items():
        assert_close(name, result.running_stats[name], expected, tolerance)
    assert result.attempts == 1


@pytest.mark.parametrize("directory", CASES, ids=[c.name for c in CASES])
def test_forward_matches_pytorch(client, tolerance, directory):
    case = load_case(directory)
    result = client.forward(case.spec.network, case.params, case.input)
    assert isinstance(result, gs.ForwardResult)
    assert_close("output", result.output, case.expected_output, tolerance)
    assert sorted(result.running_stats) == sorted(case.expected_running_stats)
    for name, expected in case.expected_running_stats.items():
        assert_close(name, result.running_stats[name], expected, tolerance)
