"""Several servers, sharding, TLS and bearer tokens, against gradserver processes.

- "A:P,B:Q" becomes an ipv4: target and calls take turns over both servers (their request
  logs); a call whose server is gone is retried on the other.
- shards=K over two servers equals the unsharded call within kShardedRelativeTolerance for
  every objective (cross-entropy with ignored labels included), both servers compute parts,
  and a network with a training batch norm is refused naming the layer.
- TLS with the test CA, mutual TLS, server name override, and "authorization: Bearer" tokens
  (none on health checks).
"""

import time

import grpc
import numpy as np
import pytest

import gradservice as gs
from gradservice.client import channel_target
from fixture_case import assert_close

RNG = np.random.default_rng(5)
NET = gs.Network([gs.Conv2d("conv1", 2, 4, 3, padding=1), gs.ReLU("relu1"),
                  gs.MaxPool2d("pool1", 2), gs.Linear("fc", 4 * 3 * 3, 5)])


def params_for(network):
    return {p.name: (0.5 * RNG.standard_normal(p.shape)).astype(np.float32)
            for p in gs.parameter_infos(network)}


def calls_logged(target, method, request_id=None):
    return sum(1 for line in target.log() if line.startswith(f"method={method} ") and (
        request_id is None or f'request_id="{request_id}"' in line))


def wait_for_log(servers, method, total, request_id=None, seconds=10):
    """The servers' counts of logged calls once they add up to `total` (their stderr is read
    by a thread, so the last lines may lag the calls)."""
    deadline = time.monotonic() + seconds
    while True:
        counts = [calls_logged(s, method, request_id) for s in servers]
        if sum(counts) >= total or time.monotonic() > deadline:
            return counts
        time.sleep(0.02)


def test_channel_targets():
    assert channel_target("127.0.0.1:5001,127.0.0.1:5002") == "ipv4:127.0.0.1:5001,127.0.0.1:5002"
    assert channel_target("[::1]:5001,[::1]:5002") == "ipv6:[::1]:5001,[::1]:5002"
    assert channel_target("localhost:5001") == "localhost:5001"
    assert channel_target("dns:///svc:50051") == "dns:///svc:50051"
    with pytest.raises(ValueError, match="must all be IP addresses"):
        channel_target("a:1,b:2")


@pytest.fixture
def two_servers(start_server):
    return start_server("--threads_per_request=1"), start_server("--threads_per_request=1")


def test_calls_take_turns_over_the_servers(two_servers):
    a, b = two_servers
    params = params_for(NET)
    x = RNG.standard_normal((2, 2, 6, 6)).astype(np.float32)
    with gs.Client(f"{a},{b}") as client:
        first = client.forward(NET, params, x).output
        for _ in range(20):
            assert np.array_equal(client.forward(NET, params, x).output, first)
    counts = wait_for_log((a, b), "Forward", 21)
    assert sum(counts) == 21 and min(counts) >= 1, counts


def test_a_call_is_retried_on_the_other_server(two_servers):
    a, b = two_servers
    params = params_for(NET)
    x = RNG.standard_normal((2, 2, 6, 6)).astype(np.float32)
    with gs.Client(f"{a},{b}") as client:
        client.forward(NET, params, x)
        assert a.stop() == 0
        for _ in range(5):
            client.forward(NET, params, x)
    assert wait_for_log((b,), "Forward", 5)[0] >= 5


OBJECTIVES = {
    "mse": lambda: gs.Mse(RNG.standard_normal((7, 5)).astype(np.float32)),
    "sum": gs.Sum,
    "grad_output": lambda: gs.GradOutput(RNG.standard_normal((7, 5)).astype(np.float32)),
    "cross_entropy": lambda: gs.CrossEntropy(np.array([0, 3, -1, 4, -1, -1, 2]), 0.1, -1),
    # The labels of the second part (rows 4..6) are all ignored: its weight is 0.
    "cross_entropy_ignored_part": lambda: gs.CrossEntropy(np.array([0, 3, 1, 4, -1, -1, -1]),
                                                          0.0, -1),
}


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_sharded_equals_unsharded(two_servers, sharded_tolerance, objective):
    a, b = two_servers
    params = params_for(NET)
    x = RNG.standard_normal((7, 2, 6, 6)).astype(np.float32)
    goal = OBJECTIVES[objective]()
    with gs.Client(f"{a},{b}") as client:
        whole = client.compute_gradients(NET, params, x, goal)
        sharded = client.compute_gradients(NET, params, x, goal, shards=2, request_id="sharded")
    assert sharded.request_id == "sharded"
    assert_close("output", sharded.output, whole.output, sharded_tolerance)
    assert_close("input_grad", sharded.input_grad, whole.input_grad, sharded_tolerance)
    if whole.loss is None:
        assert sharded.loss is None
    else:
        assert_close("loss", sharded.loss, whole.loss, sharded_tolerance)
    assert sorted(sharded.param_grads) == sorted(whole.param_grads)
    for name, grad in whole.param_grads.items():
        assert_close(name, sharded.param_grads[name], grad, sharded_tolerance)
    # Each server computed one of the two parts.
    assert wait_for_log((a, b), "ComputeGradients", 2, request_id="sharded") == [1, 1]


def test_sharded_forward_and_more_shards_than_rows(server, sharded_tolerance):
    params = params_for(NET)
    x = RNG.standard_normal((3, 2, 6, 6)).astype(np.float32)
    with gs.Client(server) as client:
        whole = client.forward(NET, params, x)
        for shards in (2, 3, 64):
            sharded = client.forward(NET, params, x, shards=shards)
            assert_close(f"output, shards={shards}", sharded.output, whole.output,
                         sharded_tolerance)


def test_a_training_batch_norm_cannot_be_sharded(server):
    net = gs.Network([gs.Conv2d("conv1", 2, 4, 3), gs.BatchNorm2d("bn1", 4), gs.ReLU("r")])
    params = params_for(net)
    x = RNG.standard_normal((4, 2, 6, 6)).astype(np.float32)
    with gs.Client(server) as client:
        with pytest.raises(ValueError, match=r"shards=2 cannot be used: layers\[1\] \('bn1', "
                                             r"batch_norm2d\) mixes the rows of the batch"):
            client.compute_gradients(net, params, x, gs.Sum(), shards=2)
        # In inference mode it is a per-row map and shards.
        net.layers[1].training = False
        params["bn1.running_mean"] = np.zeros(4, np.float32)
        params["bn1.running_var"] = np.ones(4, np.float32)
        client.compute_gradients(net, params, x, gs.Sum(), shards=2)


def test_a_failing_part_names_itself(server):
    params = params_for(NET)
    params["fc.weight"] = params["fc.weight"][:, :10]
    x = RNG.standard_normal((4, 2, 6, 6)).astype(np.float32)
    with gs.Client(server) as client:
        with pytest.raises(gs.GradServiceError) as error:
            client.compute_gradients(NET, params, x, gs.Sum(), shards=2)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.message.startswith("shard 1 of 2 (batch rows 0..1): ")
    assert "fc.weight" in error.value.message


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_text("# accepted tokens\nsecret-token-1\n", encoding="utf-8")
    return path


def test_tls_and_bearer_token(start_server, pki, token_file):
    target = start_server(f"--tls_cert={pki / 'server.pem'}", f"--tls_key={pki / 'server.key'}",
                          f"--auth_token_file={token_file}")
    params = params_for(NET)
    x = RNG.standard_normal((1, 2, 6, 6)).astype(np.float32)
    tls = gs.TlsOptions(root_ca=str(pki / "ca.pem"))
    with gs.Client(target, tls=tls, token="secret-token-1") as client:
        assert client.forward(NET, params, x).output.shape == (1, 5)
        info = client.info()
        assert info["security"]["tls"] is True
        assert info["security"]["bearer_token_required"] is True
    with gs.Client(target, tls=tls) as no_token:
        # Health needs no token, and the client sends none with it.
        assert no_token.health() == "SERVING"
        with pytest.raises(gs.GradServiceError) as error:
            no_token.forward(NET, params, x)
        assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
    with gs.Client(target, tls=tls, token="wrong-token") as wrong:
        with pytest.raises(gs.GradServiceError) as error:
            wrong.info()
        assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
    # The server's certificate names localhost and 127.0.0.1, not this name.
    with gs.Client(target, tls=gs.TlsOptions(root_ca=str(pki / "ca.pem"),
                                             server_name="other.example"),
                   token="secret-token-1", retries=1) as misnamed:
        with pytest.raises(gs.GradServiceError) as error:
            misnamed.info()
        assert error.value.code == grpc.StatusCode.UNAVAILABLE
    with gs.Client(target, tls=gs.TlsOptions(root_ca=str(pki / "ca.pem"),
                                             server_name="localhost"),
                   token="secret-token-1") as renamed:
        assert renamed.health() == "SERVING"
    # A CA that did not sign the server's certificate, and plaintext to a TLS port.
    for options in ({"tls": gs.TlsOptions(root_ca=str(pki / "other_ca.pem"))}, {}):
        with gs.Client(target, token="secret-token-1", retries=1, **options) as refused:
            with pytest.raises(gs.GradServiceError) as error:
                refused.info()
            assert error.value.code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls(start_server, pki):
    target = start_server(f"--tls_cert={pki / 'server.pem'}", f"--tls_key={pki / 'server.key'}",
                          f"--tls_client_ca={pki / 'ca.pem'}")
    ca = str(pki / "ca.pem")
    with gs.Client(target, tls=gs.TlsOptions(root_ca=ca, cert=str(pki / "client.pem"),
                                             key=str(pki / "client.key"))) as client:
        assert client.info()["security"]["client_certificates_required"] is True
    for cert in (None, "other_client"):
        options = gs.TlsOptions(root_ca=ca) if cert is None else gs.TlsOptions(
            root_ca=ca, cert=str(pki / f"{cert}.pem"), key=str(pki / f"{cert}.key"))
        with gs.Client(target, tls=options, retries=1) as refused:
            with pytest.raises(gs.GradServiceError) as error:
                refused.info()
            assert error.value.code == grpc.StatusCode.UNAVAILABLE
