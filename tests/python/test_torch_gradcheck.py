"""Finite-difference checks of RemoteNetwork's gradients, for the input and every parameter.

The remote function is float32, so torch.autograd.gradcheck's float64 defaults do not apply;
the check is done here: L(x, params) = sum(w * net(x)) for a fixed random w, central
differences of L for every element of x and of each parameter, evaluated and divided in
float64 on the host, against the gradient loss.backward() gets from the server.
"""

import pytest
import torch

import gradservice
from gradservice.torch import RemoteNetwork

# The step of the central differences.
STEP = 2e-3
# max |analytical - numerical| <= GRADCHECK_TOLERANCE * max(1, max |numerical|), from STEP and
# float32 rounding:
# - truncation: central differences are off by STEP^2 / 6 * |L'''|. A weight shared by every
#   output position sums its third derivatives over all of them: up to ~70 in these networks
#   (the training batch norm's conv weight), so ~5e-5 at this STEP.
# - rounding: each evaluation of L carries the float32 rounding (relative 2^-24 ~ 6e-8 per
#   operation) of the outputs the perturbation moved; the others are computed from the same
#   bits both times and cancel exactly. For outputs of O(1) and |w| <= 1 that is ~1e-7 in
#   L(+STEP) - L(-STEP) when a few dozen outputs move, ~6e-7 when all 144 do (an input element
#   before a training batch norm moves the batch statistics), so 3e-5 to 1.5e-4 after dividing
#   by 2 * STEP. (The step is taken as the float32 values sent, so rounding x +/- STEP to
#   float32 adds nothing.)
# The two scale oppositely in STEP; together they stay below ~2e-4. 1e-3 leaves a factor of 5
# and still fails a gradient 1% off wherever its largest element is above 0.1 (see the
# negative check).
GRADCHECK_TOLERANCE = 1e-3


def gradient_error(analytical, numerical):
    """max |analytical - numerical| / max(1, max |numerical|)."""
    scale = max(1.0, float(numerical.abs().max()))
    return float((analytical.double() - numerical).abs().max()) / scale


def objective(remote, x, weights):
    """L = sum(w * net(x)) in float64."""
    return (weights * remote(x).double()).sum()


def numerical_gradient(remote, x, weights, tensor):
    """dL/d(tensor) by central differences; `tensor` (x or a parameter, float32) is perturbed
    in place one element at a time and restored."""
    gradient = torch.zeros(tensor.shape, dtype=torch.float64)
    flat = tensor.data.view(-1)
    with torch.no_grad():
        for i in range(flat.numel()):
            original = flat[i].item()
            flat[i] = original + STEP
            above = flat[i].item()  # what float32 holds, hence what the server sees
            value_above = objective(remote, x, weights).item()
            flat[i] = original - STEP
            below = flat[i].item()
            value_below = objective(remote, x, weights).item()
            flat[i] = original
            gradient.view(-1)[i] = (value_above - value_below) / (above - below)
    return gradient


def analytical_gradients(remote, x, weights):
    """{"input": dL/dx, name: dL/d(param)} from loss.backward() through the server."""
    x = x.clone().requires_grad_()
    remote.zero_grad()
    objective(remote, x, weights).backward()
    gradients = {"input": x.grad}
    gradients.update({name: param.grad for name, param in remote.named_parameters()})
    return gradients


def spread_input(shape, seed):
    """An input whose values are all 0.05 > 2 * STEP apart (a shuffled ramp), so that
    no perturbation changes which element of a max-pool window is the largest."""
    generator = torch.Generator().manual_seed(seed)
    count = torch.Size(shape).numel()
    ramp = (torch.arange(count, dtype=torch.float32) - count / 2) * 0.05
    return ramp[torch.randperm(count, generator=generator)].view(shape)


def random_input(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


NETWORKS = {
    "conv_tanh": ([gradservice.Conv2d("conv1", 2, 3, 3, padding=1), gradservice.Tanh("tanh1"),
                   gradservice.Conv2d("conv2", 3, 2, 3, stride=2)],
                  lambda: random_input((2, 2, 5, 5), 10)),
    "pool": ([gradservice.MaxPool2d("max1", 2), gradservice.Conv2d("conv1", 2, 3, 2),
              gradservice.Tanh("tanh1"), gradservice.AvgPool2d("avg1", 2, stride=1)],
             lambda: spread_input((2, 2, 6, 6), 11)),
    "linear": ([gradservice.Conv2d("conv1", 2, 3, 3), gradservice.Tanh("tanh1"),
                gradservice.Linear("fc1", 27, 4), gradservice.Tanh("tanh2"),
                gradservice.Linear("fc2", 4, 3)],
               lambda: random_input((2, 2, 5, 5), 12)),
    "batch_norm": ([gradservice.Conv2d("conv1", 2, 3, 3, padding=1),
                    gradservice.BatchNorm2d("bn1", 3), gradservice.Tanh("tanh1")],
                   lambda: random_input((3, 2, 4, 4), 13)),
}


def make_case(client, name, training=False):
    """(remote, x, w) for NETWORKS[name]; batch norm gets running statistics and an affine
    transform away from their initial values."""
    layers, make_input = NETWORKS[name]
    torch.manual_seed(20)
    remote = RemoteNetwork(gradservice.Network(layers), client)
    remote.train(training)
    for module in remote.children():
        if module.kind == "batch_norm2d":
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    x = make_input()
    with torch.no_grad():
        shape = remote(x).shape
    weights = torch.rand(shape, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(21)) * 2 - 1
    return remote, x, weights


@pytest.mark.parametrize("name, training", [(name, False) for name in NETWORKS] +
                         [("batch_norm", True)])
def test_gradients_match_central_differences(client, name, training):
    remote, x, weights = make_case(client, name, training)
    analytical = analytical_gradients(remote, x, weights)
    targets = {"input": x}
    targets.update(dict(remote.named_parameters()))
    assert set(analytical) == set(targets)
    for what, tensor in targets.items():
        numerical = numerical_gradient(remote, x, weights, tensor)
        error = gradient_error(analytical[what], numerical)
        assert error <= GRADCHECK_TOLERANCE, (
            f"{name}: d L / d {what}: relative error {error} > {GRADCHECK_TOLERANCE}")


def test_a_gradient_one_percent_off_fails_the_check(client):
    remote, x, weights = make_case(client, "conv_tanh")
    analytical = analytical_gradients(remote, x, weights)["conv1.weight"]
    numerical = numerical_gradient(remote, x, weights, remote.conv1.weight)
    assert gradient_error(analytical, numerical) <= GRADCHECK_TOLERANCE
    # Only meaningful if a 1% error is larger than the tolerance at this gradient's scale.
    assert 0.01 * float(numerical.abs().max()) > GRADCHECK_TOLERANCE * max(
        1.0, float(numerical.abs().max()))
    assert gradient_error(1.01 * analytical, numerical) > GRADCHECK_TOLERANCE
