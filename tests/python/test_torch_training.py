"""gradservice.torch.RemoteNetwork trains like the all-local PyTorch model it stands for.

Every comparison is the project's one rule (tests/tolerance.h, fixture_case.assert_close):
max |actual - expected| <= tolerance * max(1, max |expected|).
"""

import collections

import pytest
import torch
import torch.nn.functional as F

import gradservice
from fixture_case import assert_close
from gradservice.torch import RemoteNetwork

STEPS = 20
DISTINCT_BATCHES = 4  # cycled through, so that 20 steps learn
LOSS_STEPS = 5  # of the one-call loss() path
BATCH = 8
LR = 0.05
MOMENTUM = 0.9
SEED = 0

# conv, relu, max pool, conv, relu on [BATCH, 1, 8, 8]: [BATCH, 8, 4, 4] = 128 features.
TRUNK = [gradservice.Conv2d("conv1", 1, 4, 3, padding=1), gradservice.ReLU("relu1"),
         gradservice.MaxPool2d("pool1", 2), gradservice.Conv2d("conv2", 4, 8, 3, padding=1),
         gradservice.ReLU("relu2")]
FEATURES = 8 * 4 * 4
CLASSES = 10


def local_trunk_layers():
    """The torch.nn layers of TRUNK, constructed in its order."""
    return [("conv1", torch.nn.Conv2d(1, 4, 3, padding=1)), ("relu1", torch.nn.ReLU()),
            ("pool1", torch.nn.MaxPool2d(2)), ("conv2", torch.nn.Conv2d(4, 8, 3, padding=1)),
            ("relu2", torch.nn.ReLU())]


def local_model():
    """The all-local model of TRUNK + Flatten + Linear, with the seed's weights."""
    torch.manual_seed(SEED)
    return torch.nn.Sequential(collections.OrderedDict(
        local_trunk_layers() + [("flatten", torch.nn.Flatten()),
                                ("fc", torch.nn.Linear(FEATURES, CLASSES))]))


def remote_model(client):
    """(model, trunk): the remote trunk then a local Flatten + Linear, with the seed's weights."""
    torch.manual_seed(SEED)
    trunk = RemoteNetwork(gradservice.Network(TRUNK), client)
    model = torch.nn.Sequential(collections.OrderedDict(
        [("trunk", trunk), ("flatten", torch.nn.Flatten()),
         ("fc", torch.nn.Linear(FEATURES, CLASSES))]))
    return model, trunk


def batches(count, seed=1):
    """`count` batches of random images labelled by a fixed random linear teacher, so that
    there is something to learn."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(count, BATCH, 1, 8, 8, generator=generator)
    teacher = torch.randn(8 * 8, CLASSES, generator=generator)
    labels = (inputs.flatten(2) @ teacher).argmax(dim=2)
    return inputs, labels


def paired_parameters(remote, local):
    """(name, remote tensor, local tensor) for the trunk's and the head's parameters."""
    pairs = [(name, tensor, local.get_parameter(name))
             for name, tensor in remote.trunk.named_parameters()]
    return pairs + [(f"fc.{name}", tensor, getattr(local.fc, name))
                    for name, tensor in remote.fc.named_parameters()]


def record_calls(monkeypatch, client):
    """Records the keyword arguments of every client.compute_gradients and forward call."""
    calls = []
    for method in ("forward", "compute_gradients"):
        original = getattr(client, method)

        def recorder(*args, _original=original, _method=method, **kwargs):
            calls.append((_method, kwargs))
            return _original(*args, **kwargs)

        monkeypatch.setattr(client, method, recorder)
    return calls


def test_initial_weights_equal_torch_nn_for_the_same_seed(client):
    remote, trunk = remote_model(client)
    local = local_model()
    assert [name for name, _ in trunk.named_parameters()] == [
        "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"]
    for name, remote_tensor, local_tensor in paired_parameters(remote, local):
        assert torch.equal(remote_tensor, local_tensor), name


def test_sgd_momentum_training_matches_local_model(client, tolerance):
    remote, _ = remote_model(client)
    local = local_model()
    inputs, labels = batches(DISTINCT_BATCHES)
    optimizers = [torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
                  for model in (remote, local)]
    local_losses = []
    for step in range(STEPS):
        x, y = inputs[step % DISTINCT_BATCHES], labels[step % DISTINCT_BATCHES]
        losses = []
        for model, optimizer in zip((remote, local), optimizers):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert_close(f"loss of step {step + 1}", losses[0], losses[1], tolerance)
        local_losses.append(losses[1])
    # The steps learn: the comparison is of a run that goes somewhere.
    first, last = local_losses[:DISTINCT_BATCHES], local_losses[-DISTINCT_BATCHES:]
    assert sum(last) < 0.9 * sum(first), local_losses
    for name, remote_tensor, local_tensor in paired_parameters(remote, local):
        assert_close(f"{name} after {STEPS} steps", remote_tensor.detach(),
                     local_tensor.detach(), tolerance)


def full_network():
    return gradservice.Network(TRUNK + [gradservice.Linear("fc", FEATURES, CLASSES)])


def test_one_call_loss_training_matches_local_model(client, tolerance, monkeypatch):
    torch.manual_seed(SEED)
    remote = RemoteNetwork(full_network(), client)
    local = local_model()
    local_names = [name for name, _ in local.named_parameters()]
    assert local_names == [name for name, _ in remote.named_parameters()]
    inputs, labels = batches(LOSS_STEPS)
    optimizers = [torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
                  for model in (remote, local)]
    calls = record_calls(monkeypatch, client)
    for step in range(LOSS_STEPS):
        for optimizer in optimizers:
            optimizer.zero_grad()
        remote_loss = remote.loss(inputs[step], labels[step])
        remote_loss.backward()
        local_loss = F.cross_entropy(local(inputs[step]), labels[step])
        local_loss.backward()
        assert remote_loss.dim() == 0 and remote_loss.dtype == torch.float32
        assert_close(f"loss of step {step + 1}", remote_loss.item(), local_loss.item(),
                     tolerance)
        for optimizer in optimizers:
            optimizer.step()
    # One ComputeGradients per step, nothing else; x does not require grad.
    assert [method for method, _ in calls] == ["compute_gradients"] * LOSS_STEPS
    assert all(not kwargs["input_grad"] and kwargs["param_grads"] == "all"
               for _, kwargs in calls)
    for name, tensor in remote.named_parameters():
        assert_close(f"{name} after {LOSS_STEPS} steps", tensor.detach(),
                     local.get_parameter(name).detach(), tolerance)


@pytest.mark.parametrize("objective, options", [
    ("cross_entropy", {"label_smoothing": 0.1, "ignore_index": 3}),
    ("mse", {}),
])
def test_loss_gradients_are_scaled_by_the_outer_gradient(client, tolerance, objective, options):
    torch.manual_seed(SEED)
    remote = RemoteNetwork(full_network(), client)
    local = local_model()
    inputs, labels = batches(1)
    x_remote = inputs[0].clone().requires_grad_()
    x_local = inputs[0].clone().requires_grad_()
    if objective == "cross_entropy":
        target = labels[0]
        local_loss = F.cross_entropy(local(x_local), target, **options)
    else:
        target = torch.randn(BATCH, CLASSES, generator=torch.Generator().manual_seed(2))
        local_loss = F.mse_loss(local(x_local), target)
    remote_loss = remote.loss(x_remote, target, objective=objective, **options)
    assert_close("loss", remote_loss.item(), local_loss.item(), tolerance)
    # The loss enters a larger expression: its gradients are scaled by d(total)/d(loss) = 3.
    (3.0 * remote_loss).backward()
    (3.0 * local_loss).backward()
    assert_close("x.grad", x_remote.grad, x_local.grad, tolerance)
    for name, tensor in remote.named_parameters():
        assert_close(f"{name}.grad", tensor.grad, local.get_parameter(name).grad, tolerance)


def test_input_grad_is_filled_only_when_x_requires_grad(client, tolerance, monkeypatch):
    remote, _ = remote_model(client)
    local = local_model()
    inputs, labels = batches(1)
    calls = record_calls(monkeypatch, client)
    # x behind a local operation: the remote part sits inside the graph, not at its leaf.
    x_remote = inputs[0].clone().requires_grad_()
    x_local = inputs[0].clone().requires_grad_()
    F.cross_entropy(remote(x_remote * 2.0), labels[0]).backward()
    F.cross_entropy(local(x_local * 2.0), labels[0]).backward()
    assert_close("x.grad", x_remote.grad, x_local.grad, tolerance)
    assert calls[-1][0] == "compute_gradients" and calls[-1][1]["input_grad"] is True

    F.cross_entropy(remote(inputs[0]), labels[0]).backward()
    assert calls[-1][0] == "compute_gradients" and calls[-1][1]["input_grad"] is False


def test_frozen_parameters_get_no_gradient_and_are_not_computed(client, tolerance, monkeypatch):
    remote, trunk = remote_model(client)
    local = local_model()
    trunk.conv1.weight.requires_grad_(False)
    local.conv1.weight.requires_grad_(False)
    inputs, labels = batches(1)
    calls = record_calls(monkeypatch, client)
    F.cross_entropy(remote(inputs[0]), labels[0]).backward()
    F.cross_entropy(local(inputs[0]), labels[0]).backward()
    assert trunk.conv1.weight.grad is None
    assert calls[-1][0] == "compute_gradients"
    assert calls[-1][1]["param_grads"] == ["conv1.bias", "conv2.weight", "conv2.bias"]
    for name, remote_tensor, local_tensor in paired_parameters(remote, local):
        if remote_tensor.requires_grad:
            assert_close(f"{name}.grad", remote_tensor.grad, local_tensor.grad, tolerance)

    # Everything frozen and x constant: autograd has nothing to ask the server for.
    for tensor in trunk.parameters():
        tensor.requires_grad_(False)
    before = len(calls)
    F.cross_entropy(remote(inputs[0]), labels[0]).backward()
    assert [method for method, _ in calls[before:]] == ["forward"]


# conv, batch norm, relu, conv: a BatchNorm2d's state (running statistics, num_batches_tracked)
# next to ordinary parameters.
BN_NETWORK = [gradservice.Conv2d("conv1", 2, 4, 3, padding=1),
              gradservice.BatchNorm2d("bn1", 4, momentum=0.2), gradservice.ReLU("relu1"),
              gradservice.Conv2d("conv2", 4, 3, 3, bias=False)]


def local_bn_model():
    return torch.nn.Sequential(collections.OrderedDict([
        ("conv1", torch.nn.Conv2d(2, 4, 3, padding=1)),
        ("bn1", torch.nn.BatchNorm2d(4, momentum=0.2)), ("relu1", torch.nn.ReLU()),
        ("conv2", torch.nn.Conv2d(4, 3, 3, bias=False))]))


def bn_inputs(count):
    generator = torch.Generator().manual_seed(3)
    return 1.5 * torch.randn(count, 4, 2, 6, 6, generator=generator) + 0.5


def test_state_dict_round_trip_with_a_torch_model(client, tolerance):
    torch.manual_seed(SEED)
    local = local_bn_model()
    with torch.no_grad():  # running statistics and num_batches_tracked away from their start
        for x in bn_inputs(2):
            local(x)
    state = local.state_dict()
    assert int(state["bn1.num_batches_tracked"]) == 2
    remote = RemoteNetwork(gradservice.Network(BN_NETWORK), client, state_dict=state)
    remote_state = remote.state_dict()
    assert list(remote_state) == list(state)
    for name, tensor in state.items():
        assert remote_state[name].dtype == tensor.dtype, name
        assert torch.equal(remote_state[name], tensor), name
    assert [name for name, _ in remote.named_buffers()] == [
        "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"]

    reloaded = local_bn_model()
    reloaded.load_state_dict(remote_state)
    remote.eval()
    reloaded.eval()
    x = bn_inputs(1)[0]
    assert_close("eval output", remote(x).detach(), reloaded(x).detach(), tolerance)

    incomplete = dict(state)
    del incomplete["bn1.num_batches_tracked"]
    with pytest.raises(RuntimeError, match="Missing key.*bn1.num_batches_tracked"):
        RemoteNetwork(gradservice.Network(BN_NETWORK), client, state_dict=incomplete)


def test_batch_norm_train_and_eval_follow_torch(client, tolerance):
    torch.manual_seed(SEED)
    remote = RemoteNetwork(gradservice.Network(BN_NETWORK), client)
    torch.manual_seed(SEED)
    local = local_bn_model()
    assert remote.training
    inputs = bn_inputs(4)
    # Training: batch statistics; the running ones move once per forward (not again in the
    # backward's recompute, nor for the one-call loss()).
    for step, x in enumerate(inputs[:3]):
        x_remote = x.clone().requires_grad_()
        x_local = x.clone().requires_grad_()
        remote_y = remote(x_remote)
        local_y = local(x_local)
        assert_close(f"training output {step}", remote_y.detach(), local_y.detach(), tolerance)
        remote_y.square().sum().backward()
        local_y.square().sum().backward()
        assert_close(f"x.grad {step}", x_remote.grad, x_local.grad, tolerance)
        for name, tensor in remote.named_parameters():
            assert_close(f"{name}.grad {step}", tensor.grad, local.get_parameter(name).grad,
                         tolerance)
    target = torch.zeros(4, 3, 4, 4)
    remote.loss(inputs[3], target, objective="mse").backward()
    F.mse_loss(local(inputs[3]), target).backward()
    for name in ("running_mean", "running_var"):
        assert_close(f"bn1.{name}", getattr(remote.bn1, name), getattr(local.bn1, name),
                     tolerance)
    assert int(remote.bn1.num_batches_tracked) == int(local.bn1.num_batches_tracked) == 4

    # Eval: the running statistics are used and left alone; the wire says training=false.
    remote.eval()
    local.eval()
    stats = {name: tensor.clone() for name, tensor in remote.named_buffers()}
    x = bn_inputs(1)[0]
    assert_close("eval output", remote(x).detach(), local(x).detach(), tolerance)
    for name, tensor in remote.named_buffers():
        assert torch.equal(tensor, stats[name]), name
    remote.train()
    assert remote.training and remote.bn1.training


def test_train_mode_sends_training_batch_norm(client, monkeypatch):
    remote = RemoteNetwork(gradservice.Network(BN_NETWORK), client)
    sent = []
    original = client.forward

    def recorder(network, *args, **kwargs):
        sent.append([layer.batch_norm2d.training for layer in network.layers
                     if layer.WhichOneof("op") == "batch_norm2d"])
        return original(network, *args, **kwargs)

    monkeypatch.setattr(client, "forward", recorder)
    x = bn_inputs(1)[0]
    with torch.no_grad():
        remote(x)
        remote.eval()
        remote(x)
        remote.train()
        remote(x)
    assert sent == [[True], [False], [True]]
