"""What the client sends and how it reads what comes back.

- The hand-framed requests equal protobuf's SerializeToString of the same message built with
  protobuf's API, byte for byte, for every objective, selection, shared memory references and
  tensors of every rank (empty and scalar included).
- Zero copy: a C-contiguous float32 argument reaches the framing as a memoryview of itself
  (no copy before the one join into the message); results are views of the response's bytes.
- Networks: layer objects, protobuf JSON (files as gradctl reads them) and parameter_infos.
"""

import json

import grpc
import numpy as np
import pytest

import gradservice as gs
from gradservice import _wire
from gradservice._arrays import as_float32
from gradservice._proto import gradient_service_pb2 as pb

RNG = np.random.default_rng(7)
NET = gs.Network([gs.Conv2d("conv1", 2, 3, 3, padding=1), gs.ReLU("relu1"),
                  gs.Conv2d("conv0", 3, 2, (1, 2), bias=False)])


def random_params(network):
    return {p.name: RNG.standard_normal(p.shape).astype(np.float32)
            for p in gs.parameter_infos(network)}


def tensor(array, dtype=pb.DATA_TYPE_FLOAT32):
    return pb.Tensor(shape=array.shape, dtype=dtype, data=array.tobytes())


class Captured:
    """Stands in for Client._call: records the request bytes, answers with an empty message."""

    def __init__(self):
        self.requests = []

    def __call__(self, name, request, deadline, send_token=True):
        self.requests.append((name, request))
        return b"", 1


@pytest.fixture
def offline_client(monkeypatch):
    client = gs.Client("127.0.0.1:1")
    captured = Captured()
    monkeypatch.setattr(client, "_call", captured)
    yield client, captured
    client.close()


OBJECTIVES = {
    "mse": lambda out_shape: gs.Mse(RNG.standard_normal(out_shape).astype(np.float32)),
    "sum": lambda out_shape: gs.Sum(),
    "grad_output": lambda out_shape: gs.GradOutput(
        RNG.standard_normal(out_shape).astype(np.float32)),
    "cross_entropy": lambda out_shape: gs.CrossEntropy(
        RNG.integers(0, out_shape[1], (out_shape[0],) + out_shape[2:]), 0.25, 1),
}


@pytest.mark.parametrize("objective_name", sorted(OBJECTIVES))
@pytest.mark.parametrize("selection", [("all", True, False), ("none", False, True),
                                       (["conv1.bias", "conv0.weight"], True, False)])
def test_gradients_request_equals_serialize_to_string(offline_client, objective_name, selection):
    client, captured = offline_client
    param_grads, input_grad, skip_output = selection
    params = random_params(NET)
    x = RNG.standard_normal((2, 2, 4, 5)).astype(np.float32)
    objective = OBJECTIVES[objective_name]((2, 2, 4, 4))
    client.compute_gradients(NET, params, x, objective, input_grad=input_grad,
                             param_grads=param_grads, skip_output=skip_output,
                             request_id="req-1")
    (name, sent), = captured.requests
    assert name == "ComputeGradients"

    expected = pb.ComputeGradientsRequest(network=NET.to_proto(), request_id="req-1",
                                          skip_output=skip_output)
    for param in sorted(params):
        expected.parameters.add(name=param, tensor=tensor(params[param]))
    expected.input.CopyFrom(tensor(x))
    if objective_name == "mse":
        expected.objective.mse_target.CopyFrom(tensor(objective.target))
    elif objective_name == "grad_output":
        expected.objective.grad_output.CopyFrom(tensor(objective.grad))
    elif objective_name == "sum":
        expected.objective.sum.SetInParent()
    else:
        expected.objective.cross_entropy.target.CopyFrom(
            tensor(objective.labels.astype("<i8"), pb.DATA_TYPE_INT64))
        expected.objective.cross_entropy.label_smoothing = 0.25
        expected.objective.cross_entropy.ignore_index = 1
    expected.gradients.skip_input = not input_grad
    if param_grads == "none":
        expected.gradients.no_parameters = True
    elif param_grads != "all":
        expected.gradients.parameters.extend(param_grads)
    assert sent == expected.SerializeToString()
    assert pb.ComputeGradientsRequest.FromString(sent) == expected


def test_forward_request_equals_serialize_to_string(offline_client):
    client, captured = offline_client
    params = random_params(NET)
    x = RNG.standard_normal((3, 2, 6, 6)).astype(np.float32)
    client.forward(NET, params, x, request_id="fwd")
    (name, sent), = captured.requests
    assert name == "Forward"
    expected = pb.ForwardRequest(network=NET.to_proto(), request_id="fwd", input=tensor(x))
    for param in sorted(params):
        expected.parameters.add(name=param, tensor=tensor(params[param]))
    assert sent == expected.SerializeToString()


@pytest.mark.parametrize("shape", [(), (0,), (1,), (3, 0, 2), (2, 3, 4, 5)])
def test_framing_of_tensors_of_every_rank_and_shared_memory_refs(shape):
    array = RNG.standard_normal(shape).astype(np.float32)
    ref = pb.SharedMemoryRef(region="r", offset=128, byte_size=array.nbytes)
    skeleton = pb.ComputeGradientsRequest(request_id="x")
    skeleton.parameters.add(name="a.weight", tensor=_wire.tensor_header(array))
    skeleton.parameters.add(name="b.weight", tensor=_wire.tensor_header(array, ref=ref))
    skeleton.input.CopyFrom(_wire.tensor_header(array, ref=ref))
    skeleton.objective.mse_target.CopyFrom(_wire.tensor_header(array))
    skeleton.placement.output.CopyFrom(ref)
    sent = _wire.join(_wire.frame_gradients(skeleton, [array, array], array, array))

    expected = pb.ComputeGradientsRequest()
    expected.CopyFrom(skeleton)
    expected.parameters[0].tensor.data = array.tobytes()
    expected.objective.mse_target.data = array.tobytes()
    assert sent == expected.SerializeToString()


def test_arguments_reach_the_framing_without_a_copy():
    x = RNG.standard_normal((2, 2, 4, 4)).astype(np.float32)
    assert as_float32(x, "input") is x
    header = _wire.tensor_header(x)
    skeleton = pb.ForwardRequest(input=header)
    pieces = _wire.frame_forward(skeleton, [], x)
    views = [p for p in pieces if isinstance(p, memoryview)]
    assert len(views) == 1 and views[0].obj is x
    # Only a conversion copies: float64, or a view that is not C-contiguous.
    assert as_float32(x.astype(np.float64), "input") is not x
    transposed = as_float32(x.transpose(0, 1, 3, 2), "input")
    assert transposed.flags.c_contiguous and np.array_equal(transposed, x.transpose(0, 1, 3, 2))


def response_owner(array):
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array.base


def test_results_are_views_of_the_response_bytes(client):
    params = random_params(NET)
    x = RNG.standard_normal((2, 2, 5, 5)).astype(np.float32)
    result = client.compute_gradients(NET, params, x, gs.Sum())
    arrays = [result.output, result.input_grad, *result.param_grads.values()]
    owners = {id(response_owner(a)) for a in arrays}
    assert len(owners) == 1, "every result should view the one response"
    owner = response_owner(result.output)
    assert isinstance(owner, bytes)
    for a in arrays:
        assert not a.flags.writeable and not a.flags.owndata
        assert a.dtype == np.float32
    # The views lie inside the response and do not overlap each other.
    start = np.frombuffer(owner, np.uint8).ctypes.data
    ranges = sorted((a.ctypes.data - start, a.ctypes.data - start + a.nbytes) for a in arrays)
    assert all(0 <= begin and end <= len(owner) for begin, end in ranges)
    assert all(ranges[i][1] <= ranges[i + 1][0] for i in range(len(ranges) - 1))
    assert not np.shares_memory(result.output, result.input_grad)
    assert np.array(result.output).flags.writeable


def test_decoding_rejects_a_tensor_whose_bytes_do_not_match_its_shape():
    bad = pb.ForwardResponse(output=pb.Tensor(shape=[2, 3], dtype=pb.DATA_TYPE_FLOAT32,
                                              data=b"\0" * 20))
    with pytest.raises(_wire.MalformedResponse, match=r"output.data has 20 bytes.*needs 24"):
        _wire.decode_forward(bad.SerializeToString())


def test_decoding_reads_every_field_of_a_response():
    out = RNG.standard_normal((2, 3)).astype(np.float32)
    response = pb.ComputeGradientsResponse(output=tensor(out), loss=1.5, input_grad=tensor(out),
                                           request_id="r", timing=pb.Timing(queue_ns=7))
    response.parameter_grads.add(name="fc.weight", tensor=tensor(out[0]))
    response.running_stats.add(name="bn.running_mean", tensor=tensor(out[1]))
    decoded = _wire.decode_gradients(response.SerializeToString())
    assert np.array_equal(decoded["output"], out)
    assert np.array_equal(decoded["input_grad"], out)
    assert decoded["loss"] == 1.5 and decoded["request_id"] == "r"
    assert decoded["timing"]["queue_ns"] == 7
    assert np.array_equal(decoded["param_grads"]["fc.weight"], out[0])
    assert np.array_equal(decoded["running_stats"]["bn.running_mean"], out[1])
    empty = _wire.decode_gradients(pb.ComputeGradientsResponse().SerializeToString())
    assert empty["output"] is None and empty["loss"] is None and empty["input_grad"] is None


def test_network_json_round_trip_and_gradctl_files(tmp_path):
    net = gs.Network([
        gs.Conv2d("conv1", 1, 4, (3, 2), stride=2, padding=(1, 0, 1, 0), dilation=1, groups=1),
        gs.BatchNorm2d("bn1", 4, training=False), gs.LeakyReLU("act", 0.2),
        gs.MaxPool2d("pool", 2, ceil_mode=True), gs.AvgPool2d("avg", 1, count_include_pad=False),
        gs.GELU("gelu", approximate="tanh"), gs.ELU("elu"), gs.Tanh("t"), gs.Sigmoid("s"),
        gs.Add("add", "t", input="s"), gs.Linear("fc", 16, 10)])
    assert gs.Network.from_json(net.to_json()) == net
    path = tmp_path / "net.json"
    path.write_text(net.to_json(), encoding="utf-8")
    assert gs.Network.from_json(path) == net
    assert gs.Network.from_json(str(path)) == net
    # Defaults as the proto states them: no bias, a pool's stride its kernel, training required.
    parsed = gs.Network.from_dict({"layers": [
        {"name": "c", "conv2d": {"inChannels": 1, "outChannels": 2, "kernelSize": [3]}},
        {"name": "p", "maxPool2d": {"kernelSize": [2]}}]})
    assert parsed.layers[0] == gs.Conv2d("c", 1, 2, 3, bias=False)
    assert parsed.layers[1] == gs.MaxPool2d("p", 2)
    with pytest.raises(ValueError, match="batch_norm2d.training is not set"):
        gs.Network.from_dict({"layers": [{"name": "b", "batchNorm2d": {"numFeatures": 2}}]})
    with pytest.raises(ValueError, match="not a grad.v1.Network"):
        gs.Network.from_dict({"layers": [{"name": "b", "conv9": {}}]})
    assert json.loads(net.to_json())["layers"][0]["conv2d"]["padding"] == ["1", "0", "1", "0"]


def test_parameter_infos_follow_the_servers_order():
    net = gs.Network([gs.Conv2d("conv1", 6, 4, 3, groups=2), gs.BatchNorm2d("bn1", 4),
                      gs.BatchNorm2d("bn2", 4, affine=False, training=False),
                      gs.Linear("fc", 36, 5, bias=False)])
    assert gs.parameter_infos(net) == [
        gs.ParameterInfo("conv1.weight", (4, 3, 3, 3)), gs.ParameterInfo("conv1.bias", (4,)),
        gs.ParameterInfo("bn1.weight", (4,)), gs.ParameterInfo("bn1.bias", (4,)),
        gs.ParameterInfo("bn1.running_mean", (4,), False, False),
        gs.ParameterInfo("bn1.running_var", (4,), False, False),
        gs.ParameterInfo("bn2.running_mean", (4,), False, True),
        gs.ParameterInfo("bn2.running_var", (4,), False, True),
        gs.ParameterInfo("fc.weight", (5, 36))]


def test_a_protobuf_network_is_sent_as_given(client):
    message = NET.to_proto()
    params = random_params(NET)
    x = RNG.standard_normal((1, 2, 4, 4)).astype(np.float32)
    a = client.forward(message, params, x)
    b = client.forward(NET.to_dict(), params, x)
    assert np.array_equal(a.output, b.output)
    assert a.output.shape == (1, 2, 4, 3)


def test_info_and_health(client):
    info = client.info()
    assert info["limits"]["max_message_bytes"] == str(1024 << 20)
    assert "conv2d" in info["layers"] and "cross_entropy" in info["objectives"]
    assert info["security"]["bearer_token_required"] is False
    assert client.health() == "SERVING"
    with pytest.raises(gs.GradServiceError) as error:
        client.health("no.such.Service")
    assert error.value.code == grpc.StatusCode.NOT_FOUND
