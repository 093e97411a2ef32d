"""Errors: the server's (one exception type with the gRPC code and message), retries of
UNAVAILABLE within the deadline, DEADLINE_EXCEEDED, and the client's own argument checks
(TypeError / ValueError naming the argument); float64 and float16 arrays converted."""

import socket
import time

import grpc
import numpy as np
import pytest

import gradservice as gs
from fixture_case import assert_close

RNG = np.random.default_rng(11)
NET = gs.Network([gs.Conv2d("conv1", 1, 4, 3, padding=1), gs.ReLU("relu1")])


def params_for(network, dtype=np.float32):
    return {p.name: RNG.standard_normal(p.shape).astype(dtype)
            for p in gs.parameter_infos(network)}


def unused_port():
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CountingMethod:
    def __init__(self, method):
        self.method = method
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.method(*args, **kwargs)


def count_attempts(client, monkeypatch):
    counters = {}
    original = client._method  # pylint: disable=protected-access

    def method(name):
        if name not in counters:
            counters[name] = CountingMethod(original(name))
        return counters[name]

    monkeypatch.setattr(client, "_method", method)
    return counters


def test_a_bad_network_is_invalid_argument_with_the_servers_message(client):
    bad = gs.Network([gs.Conv2d("conv1", 0, 4, 3)])
    x = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(gs.GradServiceError) as error:
        client.compute_gradients(bad, params_for(NET), x, gs.Sum())
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "layers[0].conv2d.in_channels=0" in error.value.message
    assert str(error.value).startswith("INVALID_ARGUMENT: layers[0].conv2d.in_channels=0")


def test_a_parameter_of_the_wrong_shape_is_named(client):
    params = params_for(NET)
    params["conv1.weight"] = params["conv1.weight"][:2]
    with pytest.raises(gs.GradServiceError) as error:
        client.forward(NET, params, np.zeros((1, 1, 4, 4), np.float32))
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "conv1.weight" in error.value.message


def test_an_unreachable_server_is_unavailable_after_every_retry(monkeypatch):
    retry = gs.RetryOptions(max_attempts=4, initial_backoff=0.05, max_backoff=2.0,
                            backoff_multiplier=2.0, jitter=0.0)
    with gs.Client(f"127.0.0.1:{unused_port()}", retries=retry) as client:
        counters = count_attempts(client, monkeypatch)
        start = time.monotonic()
        with pytest.raises(gs.GradServiceError) as error:
            client.forward(NET, params_for(NET), np.zeros((1, 1, 4, 4), np.float32))
        elapsed = time.monotonic() - start
    assert error.value.code == grpc.StatusCode.UNAVAILABLE
    assert counters["Forward"].calls == 4
    # Three waits between the four attempts: 0.05 + 0.1 + 0.2 s.
    assert elapsed >= 0.35


def test_retries_never_pass_the_deadline(monkeypatch):
    retry = gs.RetryOptions(max_attempts=1000, initial_backoff=0.05, max_backoff=0.2)
    with gs.Client(f"127.0.0.1:{unused_port()}", retries=retry, timeout=0.5) as client:
        counters = count_attempts(client, monkeypatch)
        start = time.monotonic()
        with pytest.raises(gs.GradServiceError) as error:
            client.info()
        elapsed = time.monotonic() - start
    assert error.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert 1 < counters["GetInfo"].calls < 1000
    # No wait starts that would end past the deadline; the slack is for a loaded machine.
    assert elapsed < 0.5 + 2.0


def test_retries_1_makes_one_attempt(monkeypatch):
    with gs.Client(f"127.0.0.1:{unused_port()}", retries=1) as client:
        counters = count_attempts(client, monkeypatch)
        with pytest.raises(gs.GradServiceError) as error:
            client.info()
    assert error.value.code == grpc.StatusCode.UNAVAILABLE
    assert counters["GetInfo"].calls == 1


def test_a_tiny_timeout_on_a_big_call_is_deadline_exceeded(client):
    net = gs.Network([gs.Conv2d("conv1", 16, 32, 3, padding=1), gs.ReLU("relu1"),
                      gs.Conv2d("conv2", 32, 32, 3, padding=1)])
    x = RNG.standard_normal((8, 16, 64, 64)).astype(np.float32)
    with pytest.raises(gs.GradServiceError) as error:
        client.compute_gradients(net, params_for(net), x, gs.Sum(), timeout=0.001)
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # The client's default timeout is per Client too.
    with gs.Client(client.target, timeout=0.001) as hurried:
        with pytest.raises(gs.GradServiceError) as error:
            hurried.compute_gradients(net, params_for(net), x, gs.Sum())
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.parametrize("argument, call", [
    ("input", lambda c, p, x: c.forward(NET, p, x.astype(np.int64))),
    ("params['conv1.weight']",
     lambda c, p, x: c.forward(NET, dict(p, **{"conv1.weight": p["conv1.weight"].astype(int)}),
                               x)),
    ("objective.target", lambda c, p, x: c.compute_gradients(
        NET, p, x, gs.Mse(np.zeros((1, 4, 4, 4), np.int32)))),
    ("objective.labels", lambda c, p, x: c.compute_gradients(
        NET, p, x, gs.CrossEntropy(np.zeros((1, 4, 4), np.float32)))),
    ("input", lambda c, p, x: c.forward(NET, p, x.tolist())),
    ("objective", lambda c, p, x: c.compute_gradients(NET, p, x, "mse")),
    ("params", lambda c, p, x: c.forward(NET, list(p.values()), x)),
    ("network", lambda c, p, x: c.forward(42, p, x)),
    ("layers[1]", lambda c, p, x: c.forward([NET.layers[0], "relu"], p, x)),
])
def test_wrong_types_are_a_type_error_naming_the_argument(client, argument, call):
    x = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(TypeError) as error:
        call(client, params_for(NET), x)
    assert str(error.value).startswith(argument + ":"), str(error.value)


def test_the_int64_message_names_the_dtype(client):
    with pytest.raises(TypeError, match=r"^input: expected a numpy array of floats, got int64$"):
        client.forward(NET, params_for(NET), np.zeros((1, 1, 4, 4), np.int64))


@pytest.mark.parametrize("kwargs, message", [
    ({"param_grads": "some"}, "param_grads='some'"),
    ({"shards": 0}, "shards=0 is out of range 1..64"),
    ({"shards": 65}, "shards=65 is out of range 1..64"),
    ({"timeout": -1}, "timeout=-1"),
])
def test_bad_values_are_a_value_error_naming_them(client, kwargs, message):
    x = np.zeros((2, 1, 4, 4), np.float32)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(".", r"\.")):
        client.compute_gradients(NET, params_for(NET), x, gs.Sum(), **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"retries": 0}, "retries.max_attempts=0"),
    ({"max_message_mb": 4096}, "max_message_mb=4096"),
    ({"timeout": 0}, "timeout=0"),
    ({"token": "has space"}, "token may hold only printable ASCII"),
    ({"tls": gs.TlsOptions(cert="c.pem")}, "tls.cert and tls.key"),
    ({"tls": gs.TlsOptions(root_ca="/nonexistent/ca.pem")}, "tls.root_ca=/nonexistent/ca.pem"),
])
def test_bad_client_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        gs.Client("127.0.0.1:1", **kwargs)


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_float64_and_float16_are_converted_to_float32(client, tolerance, dtype):
    params32 = params_for(NET)
    x32 = RNG.standard_normal((2, 1, 5, 5)).astype(dtype).astype(np.float32)
    target32 = RNG.standard_normal((2, 4, 5, 5)).astype(dtype).astype(np.float32)
    params16 = {name: value.astype(dtype).astype(np.float32) for name, value in params32.items()}
    expected = client.compute_gradients(NET, params16, x32, gs.Mse(target32))
    converted = client.compute_gradients(
        NET, {name: value.astype(dtype) for name, value in params16.items()}, x32.astype(dtype),
        gs.Mse(target32.astype(dtype)))
    # The same float32 values, so the same request: results equal to the float32 call's.
    assert_close("output", converted.output, expected.output, tolerance)
    assert_close("loss", converted.loss, expected.loss, tolerance)
    assert_close("input_grad", converted.input_grad, expected.input_grad, tolerance)
    for name, grad in expected.param_grads.items():
        assert_close(name, converted.param_grads[name], grad, tolerance)
    assert converted.output.dtype == np.float32


def test_non_contiguous_arrays_are_copied_not_refused(client, tolerance):
    params = params_for(NET)
    x = RNG.standard_normal((2, 1, 5, 5)).astype(np.float32)
    wide = np.zeros((2, 1, 5, 10), np.float32)
    wide[..., ::2] = x
    a = client.forward(NET, params, x)
    b = client.forward(NET, params, wide[..., ::2])
    assert_close("output", b.output, a.output, tolerance)


def test_request_ids_are_echoed_and_made_up_when_absent(client):
    x = np.zeros((1, 1, 4, 4), np.float32)
    assert client.forward(NET, params_for(NET), x, request_id="abc-1").request_id == "abc-1"
    made_up = client.forward(NET, params_for(NET), x).request_id
    assert len(made_up) == 16 and int(made_up, 16) >= 0
