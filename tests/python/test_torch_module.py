"""gradservice.torch as a module: the docstring's example, import isolation, dtypes, devices,
argument errors, initialisation of every parametrised kind and deepcopy of RemoteNetwork."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import gradservice
import gradservice.torch as gt
from fixture_case import assert_close

# The address the module docstring's example connects to.
EXAMPLE_TARGET = "localhost:50051"

NETWORK = gradservice.Network([gradservice.Conv2d("conv1", 2, 3, 3, padding=1),
                               gradservice.Tanh("tanh1"), gradservice.Linear("fc", 3 * 4 * 4, 5)])


def local_model():
    conv = torch.nn.Conv2d(2, 3, 3, padding=1)
    fc = torch.nn.Linear(3 * 4 * 4, 5)
    return conv, fc, lambda x: fc(torch.tanh(conv(x)).flatten(1))


def example_code():
    """The indented block of the module docstring that starts at `import gradservice`."""
    doc = gt.__doc__
    start = doc.index("    import gradservice")
    end = doc.index("\n\n", start)
    return textwrap.dedent(doc[start:end])


def test_module_docstring_example_runs_as_written(server, repo_root, monkeypatch):
    code = example_code()
    assert len(code.splitlines()) == 3 and code.count(EXAMPLE_TARGET) == 1
    assert ".backward()" in code.splitlines()[-1]
    monkeypatch.chdir(repo_root)  # the example's network path is relative to the root
    namespace = {}
    exec(compile(code.replace(EXAMPLE_TARGET, server), "example", "exec"),  # noqa: S102
         namespace)
    net = namespace["net"]
    try:
        for name, param in net.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    finally:
        net.client.close()


def test_importing_gradservice_does_not_import_torch(repo_root):
    check = "import sys, gradservice; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", check], check=True, cwd=repo_root,
                   env={"PYTHONPATH": str(repo_root / "python")})


def test_float64_tensors_are_sent_as_float32_and_cast_back(client, tolerance):
    torch.manual_seed(0)
    remote = gt.RemoteNetwork(NETWORK, client).double()
    torch.manual_seed(0)
    conv, fc, local = local_model()
    conv.double()
    fc.double()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    x_remote = x.clone().requires_grad_()
    x_local = x.clone().requires_grad_()
    y = remote(x_remote)
    assert y.dtype == torch.float64
    assert_close("output", y.detach(), local(x_local).detach(), tolerance)
    y.sum().backward()
    local(x_local).sum().backward()
    assert x_remote.grad.dtype == torch.float64
    assert_close("x.grad", x_remote.grad, x_local.grad, tolerance)
    assert remote.conv1.weight.grad.dtype == torch.float64
    assert_close("conv1.weight.grad", remote.conv1.weight.grad, conv.weight.grad, tolerance)
    loss = remote.loss(x, torch.tensor([0, 4]))
    assert loss.dtype == torch.float64 and loss.dim() == 0


def test_non_cpu_and_non_float_tensors_are_refused(client):
    remote = gt.RemoteNetwork(NETWORK, client)
    with pytest.raises(ValueError, match="input is on meta"):
        remote(torch.empty(2, 2, 4, 4, device="meta"))
    with pytest.raises(TypeError, match="input: expected a floating-point tensor, got torch.int64"):
        remote(torch.zeros(2, 2, 4, 4, dtype=torch.int64))
    remote.fc.bias = torch.nn.Parameter(torch.empty(5, device="meta"))
    with pytest.raises(ValueError, match="fc.bias is on meta"):
        remote(torch.zeros(2, 2, 4, 4))


def test_loss_arguments_are_checked(client):
    remote = gt.RemoteNetwork(NETWORK, client)
    x = torch.zeros(2, 2, 4, 4)
    with pytest.raises(ValueError, match="objective='sum'"):
        remote.loss(x, torch.tensor([0, 1]), objective="sum")
    with pytest.raises(TypeError, match="class indices .* got torch.float32"):
        remote.loss(x, torch.zeros(2))
    with pytest.raises(ValueError, match="label_smoothing=0.1: only cross_entropy"):
        remote.loss(x, torch.zeros(2, 5), objective="mse", label_smoothing=0.1)
    with pytest.raises(ValueError, match="target requires grad"):
        remote.loss(x, torch.zeros(2, 5, requires_grad=True), objective="mse")
    with pytest.raises(TypeError, match="target: expected a torch.Tensor, got list"):
        remote.loss(x, [0, 1])
    # The server checks what it owns, and its error names the field.
    with pytest.raises(gradservice.GradServiceError, match="INVALID_ARGUMENT"):
        remote.loss(x, torch.tensor([0, 7]))


def test_constructor_arguments_are_checked(client):
    with pytest.raises(TypeError, match="client: expected a gradservice.Client, got str"):
        gt.RemoteNetwork(NETWORK, "localhost:50051")
    with pytest.raises(ValueError, match=r"layers\[0\] \('forward'\)"):
        gt.RemoteNetwork([gradservice.Linear("forward", 4, 2)], client)
    with pytest.raises(ValueError, match=r"layers\[1\] \('fc.1'\): a layer name containing"):
        gt.RemoteNetwork([gradservice.ReLU("relu"), gradservice.Linear("fc.1", 4, 2)], client)
    state = gt.RemoteNetwork(NETWORK, client).state_dict()
    state["conv9.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="Unexpected key.*conv9.weight"):
        gt.RemoteNetwork(NETWORK, client, state_dict=state)


def test_loss_without_grad_asks_for_no_gradients(client, monkeypatch, tolerance):
    remote = gt.RemoteNetwork(NETWORK, client)
    calls = []
    original = client.compute_gradients

    def recorder(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(client, "compute_gradients", recorder)
    x = torch.randn(2, 2, 4, 4)
    labels = torch.tensor([1, 3])
    with torch.no_grad():
        loss = remote.loss(x, labels)
    assert not loss.requires_grad
    assert calls[-1]["input_grad"] is False and calls[-1]["param_grads"] == "none"
    assert_close("loss", loss.item(), F.cross_entropy(remote(x), labels).item(), tolerance)

    # A loss can be back-propagated more than once, like torch's (retain_graph).
    loss = remote.loss(x, labels)
    loss.backward(retain_graph=True)
    first = remote.fc.weight.grad.clone()
    loss.backward()
    assert_close("twice the gradient", remote.fc.weight.grad, 2 * first, tolerance)


def test_initialisation_matches_torch_nn_for_every_parametrised_kind(client):
    layers = [gradservice.Conv2d("conv1", 4, 6, (3, 2), stride=2, padding=(1, 0, 2, 1),
                                 dilation=(1, 2), groups=2),
              gradservice.BatchNorm2d("bn1", 6, eps=1e-3, momentum=0.3),
              gradservice.Conv2d("conv2", 6, 3, 1, bias=False),
              gradservice.BatchNorm2d("bn2", 3, affine=False),
              gradservice.Linear("fc1", 48, 7), gradservice.Linear("fc2", 7, 2, bias=False)]
    torch.manual_seed(3)
    remote = gt.RemoteNetwork(layers, client)
    torch.manual_seed(3)
    local = {"conv1": torch.nn.Conv2d(4, 6, (3, 2), stride=2, dilation=(1, 2), groups=2),
             "bn1": torch.nn.BatchNorm2d(6, eps=1e-3, momentum=0.3),
             "conv2": torch.nn.Conv2d(6, 3, 1, bias=False),
             "bn2": torch.nn.BatchNorm2d(3, affine=False),
             "fc1": torch.nn.Linear(48, 7), "fc2": torch.nn.Linear(7, 2, bias=False)}
    expected = {f"{layer}.{name}": tensor for layer, module in local.items()
                for name, tensor in module.state_dict().items()}
    state = remote.state_dict()
    assert list(state) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    assert [name for name, _ in remote.named_parameters()] == [
        "conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias", "conv2.weight", "fc1.weight",
        "fc1.bias", "fc2.weight"]


def test_deepcopy_has_its_own_tensors_and_shares_the_client(client, tolerance):
    remote = gt.RemoteNetwork(NETWORK, client)
    duplicate = copy.deepcopy(remote)
    assert duplicate.client is client
    x = torch.randn(2, 2, 4, 4)
    assert_close("copy's output", duplicate(x).detach(), remote(x).detach(), tolerance)
    with torch.no_grad():
        duplicate.fc.bias.add_(1.0)
    assert not torch.equal(duplicate.fc.bias, remote.fc.bias)
    duplicate(x).sum().backward()
    assert duplicate.fc.bias.grad is not None and remote.fc.bias.grad is None
