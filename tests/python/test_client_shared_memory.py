"""Client(shared_memory=True) against a gradserver started with --allow_shared_memory: tensors
travel as references into a registered POSIX shared memory region and the server writes the
results there; results match PyTorch's fixtures and the socket path, regions are reused once
results are gone, and a server without the flag refuses with FAILED_PRECONDITION."""

import gc
import mmap
import os
import pathlib

import grpc
import numpy as np
import pytest

import gradservice as gs
from gradservice._proto import gradient_service_pb2 as pb
from fixture_case import assert_close, find_cases, load_case

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures"
CASES = [c for c in find_cases(FIXTURES)
         if c.name in ("lenet5_cross_entropy", "resnet_basic_block", "chain4_mixed_mse",
                       "batch_norm_train_running_stats", "forward_only_request",
                       "bias_grads_only")]


@pytest.fixture(scope="module")
def shm_server(gradserver_binary):
    from conftest import launch  # pylint: disable=import-outside-toplevel
    target = launch(gradserver_binary, "--allow_shared_memory")
    yield target
    target.stop()


@pytest.fixture
def shm_client(shm_server):
    with gs.Client(shm_server, shared_memory=True) as client:
        yield client


def our_shm_objects():
    return [name for name in os.listdir("/dev/shm")
            if name.startswith(f"gradclient-{os.getpid()}-")]


def region_status(client):
    response, _ = client._call(  # pylint: disable=protected-access
        "GetSharedMemoryStatus", pb.GetSharedMemoryStatusRequest().SerializeToString(), None)
    return pb.GetSharedMemoryStatusResponse.FromString(response).regions


def test_the_case_list_is_not_empty():
    assert len(CASES) == 6


@pytest.mark.parametrize("directory", CASES, ids=[c.name for c in CASES])
def test_fixtures_through_shared_memory(shm_client, tolerance, directory):
    case = load_case(directory)
    spec = case.spec
    result = shm_client.compute_gradients(spec.network, case.params, case.input, case.objective,
                                          input_grad=spec.input_grad,
                                          param_grads=spec.param_grads)
    assert_close("output", result.output, case.expected_output, tolerance)
    if case.expected_loss is not None:
        assert_close("loss", result.loss, case.expected_loss, tolerance)
    if case.expected_input_grad is not None:
        assert_close("input_grad", result.input_grad, case.expected_input_grad, tolerance)
    else:
        assert result.input_grad is None
    assert sorted(result.param_grads) == sorted(case.expected_param_grads)
    for name, expected in case.expected_param_grads.items():
        assert_close(name, result.param_grads[name], expected, tolerance)
    for name, expected in case.expected_running_stats.items():
        assert_close(name, result.running_stats[name], expected, tolerance)
    forward = shm_client.forward(spec.network, case.params, case.input)
    assert_close("forward output", forward.output, case.expected_output, tolerance)


def test_results_live_in_the_region_and_the_request_carried_references(shm_server, monkeypatch):
    net = gs.Network([gs.Conv2d("conv1", 3, 8, 3, padding=1), gs.ReLU("relu1")])
    rng = np.random.default_rng(3)
    params = {p.name: rng.standard_normal(p.shape).astype(np.float32)
              for p in gs.parameter_infos(net)}
    x = rng.standard_normal((4, 3, 16, 16)).astype(np.float32)
    target = rng.standard_normal((4, 8, 16, 16)).astype(np.float32)
    with gs.Client(shm_server) as plain:
        expected = plain.compute_gradients(net, params, x, gs.Mse(target))
    with gs.Client(shm_server, shared_memory=True) as client:
        sizes = []
        original = client._call  # pylint: disable=protected-access

        def recording(name, request, deadline, send_token=True):
            if name == "ComputeGradients":
                sizes.append(len(request))
                sent = pb.ComputeGradientsRequest.FromString(request)
                assert sent.input.HasField("shared_memory") and not sent.input.data
                assert sent.objective.mse_target.HasField("shared_memory")
                assert all(p.tensor.HasField("shared_memory") for p in sent.parameters)
                assert sent.placement.HasField("output")
                assert sent.placement.HasField("input_grad")
                assert [g.name for g in sent.placement.parameter_grads] == \
                    ["conv1.bias", "conv1.weight"]
            return original(name, request, deadline, send_token)

        monkeypatch.setattr(client, "_call", recording)
        result = client.compute_gradients(net, params, x, gs.Mse(target))
        # Only the skeleton crossed the socket: far less than the input alone.
        assert sizes and sizes[0] < x.nbytes // 4
        for name, actual, reference in [("output", result.output, expected.output),
                                        ("input_grad", result.input_grad, expected.input_grad),
                                        ("conv1.weight", result.param_grads["conv1.weight"],
                                         expected.param_grads["conv1.weight"])]:
            assert np.array_equal(actual, reference), name
            owner = actual
            while isinstance(owner.base, np.ndarray):
                owner = owner.base
            assert isinstance(owner.base, memoryview), name
            assert isinstance(owner.base.obj, mmap.mmap), name
            assert actual.flags.writeable
        # The object's name is gone from /dev/shm once the server has mapped it.
        assert our_shm_objects() == []
        assert len(region_status(client)) == 1

        # While the results are alive, the next call needs a region of its own ...
        second = client.forward(net, params, x)
        assert len(region_status(client)) == 2
        # ... and once they are gone, calls reuse the free regions.
        del result, actual, reference, owner, second
        gc.collect()
        for _ in range(3):
            client.forward(net, params, x)
        assert len(region_status(client)) == 2
    with gs.Client(shm_server) as plain:
        assert len(region_status(plain)) == 0


def test_a_view_of_a_result_keeps_its_region_in_use(shm_server):
    net = gs.Network([gs.Conv2d("conv1", 1, 2, 3)])
    params = {p.name: np.ones(p.shape, np.float32) for p in gs.parameter_infos(net)}
    x = np.ones((2, 1, 5, 5), np.float32)
    with gs.Client(shm_server, shared_memory=True) as client:
        result = client.forward(net, params, x)
        row = result.output[1]
        expected = np.array(row)
        del result
        gc.collect()
        # The region still holds `row`: the next call must not write its results over it.
        client.forward(net, {name: 2 * value for name, value in params.items()}, x)
        assert len(region_status(client)) == 2
        assert np.array_equal(row, expected)
        del row
        gc.collect()
        client.forward(net, params, x)
        assert len(region_status(client)) == 2


def test_a_server_without_the_flag_refuses(server):
    net = gs.Network([gs.Conv2d("conv1", 1, 2, 3)])
    params = {p.name: np.ones(p.shape, np.float32) for p in gs.parameter_infos(net)}
    with gs.Client(server, shared_memory=True) as client:
        with pytest.raises(gs.GradServiceError) as error:
            client.forward(net, params, np.ones((1, 1, 5, 5), np.float32))
    assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "--allow_shared_memory" in error.value.message
    assert our_shm_objects() == []


def test_sharding_is_refused_with_shared_memory(shm_client):
    net = gs.Network([gs.Conv2d("conv1", 1, 2, 3)])
    params = {p.name: np.ones(p.shape, np.float32) for p in gs.parameter_infos(net)}
    with pytest.raises(ValueError, match="shards=2 with shared_memory=True"):
        shm_client.forward(net, params, np.ones((2, 1, 5, 5), np.float32), shards=2)
