#!/usr/bin/python3
"""Writes PyTorch reference cases for the gradient engine's tests.

Each case is a directory holding the network spec (case.txt), its inputs and parameters and
what PyTorch computes for them (output, loss, gradients), all as float32 .npy files. The
format is read by tests/torch/fixture.cc; see tests/fixtures/README.md.

PyTorch runs in float32 on its native CPU kernels (oneDNN disabled, one thread), following
torch.nn.functional semantics. Every case is also run in float64; a case is kept only if
its float32 results agree with float64 to a tenth of the tests' tolerance and no input of a
kinked activation (relu, leaky_relu, elu with alpha != 1) lies so close to the kink that
rounding could move it across. Otherwise the case is redrawn from the next seed, so the
stored values are well conditioned for any correct float32 implementation.

Usage:
  /usr/bin/python3 tests/torch/generate_fixtures.py [--out DIR]
      Writes the committed cases (default DIR: tests/fixtures next to this script).
  /usr/bin/python3 tests/torch/generate_fixtures.py --live --out DIR --seed S --count N
      Writes N random configurations drawn from seed S.

Output is deterministic: the same arguments give byte-identical files.
"""

import argparse
import dataclasses
import os
import random
import shutil
import sys
import zlib
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

torch.backends.mkldnn.enabled = False
torch.set_num_threads(1)

# The tests' tolerance (tests/tolerance.h). Stored results must match float64 to a tenth of
# it, leaving the rest for the implementation under test.
TEST_TOLERANCE = 1e-4
CONDITIONING_TOLERANCE = TEST_TOLERANCE / 10
# A kinked activation's inputs must stay this far from the kink, relative to the largest
# input magnitude of that layer. float32 rounding moves a pre-activation by ~1e-7 of it.
KINK_MARGIN = 3e-6
MAX_ATTEMPTS = 200

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "elu", "gelu", "gelu_tanh")
OBJECTIVES = ("mse", "sum", "grad_output")


@dataclasses.dataclass(frozen=True)
class Conv2d:
    in_channels: int
    out_channels: int
    kernel: Tuple[int, int]
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int, int, int] = (0, 0, 0, 0)  # top, bottom, left, right
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True

    def spec(self) -> str:
        return ("conv2d in_channels=%d out_channels=%d kernel=%d,%d stride=%d,%d "
                "padding=%d,%d,%d,%d dilation=%d,%d groups=%d bias=%d" %
                (self.in_channels, self.out_channels, *self.kernel, *self.stride,
                 *self.padding, *self.dilation, self.groups, int(self.bias)))


@dataclasses.dataclass(frozen=True)
class Activation:
    kind: str
    alpha: Optional[float] = None  # negative_slope for leaky_relu, alpha for elu

    def spec(self) -> str:
        if self.kind == "leaky_relu":
            return "leaky_relu negative_slope=%r" % self.alpha
        if self.kind == "elu":
            return "elu alpha=%r" % self.alpha
        return self.kind

    def has_kink(self) -> bool:
        # Where the derivative jumps at 0, a sign flip from rounding changes the gradient.
        return (self.kind in ("relu", "leaky_relu") or
                (self.kind == "elu" and self.alpha != 1.0))


Op = Union[Conv2d, Activation]


@dataclasses.dataclass
class Case:
    name: str
    description: str
    input_shape: Tuple[int, int, int, int]
    layers: List[Tuple[str, Op]]
    objective: str = "mse"
    input_grad: bool = True
    # "all", "none" or a list of parameter names.
    param_grads: Union[str, List[str]] = "all"
    # "randn": parameters are plain randn, as in the seed notebook. "scaled": weights are
    # randn / sqrt(fan_in) and biases 0.5 * randn, keeping activations O(1) so that tanh,
    # sigmoid and gelu are exercised away from saturation.
    init: str = "scaled"
    seed: Optional[int] = None

    def base_seed(self) -> int:
        return self.seed if self.seed is not None else zlib.crc32(self.name.encode())

    def parameter_names(self) -> List[str]:
        names = []
        for layer_name, op in self.layers:
            if isinstance(op, Conv2d):
                names.append(layer_name + ".weight")
                if op.bias:
                    names.append(layer_name + ".bias")
        return names

    def requested_params(self) -> List[str]:
        if self.param_grads == "all":
            return self.parameter_names()
        if self.param_grads == "none":
            return []
        return list(self.param_grads)

    def spec_lines(self) -> List[str]:
        lines = ["layer %s %s" % (name, op.spec()) for name, op in self.layers]
        lines.append("objective " + self.objective)
        lines.append("input_grad %d" % int(self.input_grad))
        if isinstance(self.param_grads, str):
            lines.append("param_grads " + self.param_grads)
        else:
            lines.append("param_grads " + " ".join(self.param_grads))
        return lines


def conv(in_channels, out_channels, kernel, stride=1, padding=0, dilation=1, groups=1,
         bias=True) -> Conv2d:
    """Builds a Conv2d from PyTorch-like arguments (ints or tuples; padding may have 4)."""

    def pair(v):
        return (v, v) if isinstance(v, int) else tuple(v)

    if isinstance(padding, int):
        padding = (padding,) * 4
    elif len(padding) == 2:
        padding = (padding[0], padding[0], padding[1], padding[1])
    return Conv2d(in_channels, out_channels, pair(kernel), pair(stride), tuple(padding),
                  pair(dilation), groups, bias)


def act(kind, alpha=None) -> Activation:
    if kind == "leaky_relu" and alpha is None:
        alpha = 0.01
    if kind == "elu" and alpha is None:
        alpha = 1.0
    return Activation(kind, alpha)


def conv_output_size(size, kernel, stride, pad_begin, pad_end, dilation) -> int:
    span = dilation * (kernel - 1) + 1
    return (size + pad_begin + pad_end - span) // stride + 1


def output_shape(case: Case) -> Tuple[int, ...]:
    n, c, h, w = case.input_shape
    for _, op in case.layers:
        if isinstance(op, Conv2d):
            if c != op.in_channels:
                raise ValueError("%s: in_channels %d != %d" % (case.name, op.in_channels, c))
            h = conv_output_size(h, op.kernel[0], op.stride[0], op.padding[0], op.padding[1],
                                 op.dilation[0])
            w = conv_output_size(w, op.kernel[1], op.stride[1], op.padding[2], op.padding[3],
                                 op.dilation[1])
            c = op.out_channels
            if h < 1 or w < 1:
                raise ValueError("%s: empty output" % case.name)
    return (n, c, h, w)


def draw_arrays(case: Case, seed: int) -> Dict[str, np.ndarray]:
    """Draws input, parameters and objective tensor, in the seed notebook's order."""
    torch.manual_seed(seed)
    arrays = {"input": torch.randn(*case.input_shape)}
    for layer_name, op in case.layers:
        if not isinstance(op, Conv2d):
            continue
        fan_in = (op.in_channels // op.groups) * op.kernel[0] * op.kernel[1]
        weight = torch.randn(op.out_channels, op.in_channels // op.groups, *op.kernel)
        if case.init == "scaled":
            weight = weight / float(np.sqrt(fan_in))
        arrays[layer_name + ".weight"] = weight
        if op.bias:
            bias = torch.randn(op.out_channels)
            if case.init == "scaled":
                bias = bias * 0.5
            arrays[layer_name + ".bias"] = bias
    if case.objective == "mse":
        arrays["target"] = torch.randn(*output_shape(case))
    elif case.objective == "grad_output":
        arrays["grad_output"] = torch.randn(*output_shape(case))
    return {k: v.numpy().astype(np.float32) for k, v in arrays.items()}


def apply_activation(op: Activation, x: torch.Tensor) -> torch.Tensor:
    if op.kind == "relu":
        return F.relu(x)
    if op.kind == "leaky_relu":
        return F.leaky_relu(x, negative_slope=op.alpha)
    if op.kind == "tanh":
        return torch.tanh(x)
    if op.kind == "sigmoid":
        return torch.sigmoid(x)
    if op.kind == "elu":
        return F.elu(x, alpha=op.alpha)
    if op.kind == "gelu":
        return F.gelu(x)
    if op.kind == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    raise ValueError("unknown activation " + op.kind)


def apply_conv(op: Conv2d, x, weight, bias):
    top, bottom, left, right = op.padding
    if top == bottom and left == right:
        padding = (top, left)
    else:
        x = F.pad(x, (left, right, top, bottom))
        padding = (0, 0)
    return F.conv2d(x, weight, bias, stride=op.stride, padding=padding, dilation=op.dilation,
                    groups=op.groups)


def run(case: Case, arrays: Dict[str, np.ndarray], dtype):
    """Returns (results by file stem, [(activation, its input)])."""
    requested = set(case.requested_params())
    x = torch.tensor(arrays["input"], dtype=dtype, requires_grad=case.input_grad)
    params = {
        name: torch.tensor(arrays[name], dtype=dtype, requires_grad=name in requested)
        for name in case.parameter_names()
    }
    y = x
    activation_inputs = []
    for layer_name, op in case.layers:
        if isinstance(op, Conv2d):
            y = apply_conv(op, y, params[layer_name + ".weight"],
                           params.get(layer_name + ".bias"))
        else:
            activation_inputs.append((op, y.detach().clone()))
            y = apply_activation(op, y)

    results = {"output": y}
    needs_backward = case.input_grad or requested
    if case.objective == "mse":
        target = torch.tensor(arrays["target"], dtype=dtype)
        loss = torch.mean((y - target)**2)
        results["loss"] = loss.reshape(1)
        if needs_backward:
            loss.backward()
    elif case.objective == "sum":
        loss = torch.sum(y)
        results["loss"] = loss.reshape(1)
        if needs_backward:
            loss.backward()
    else:
        if needs_backward:
            y.backward(torch.tensor(arrays["grad_output"], dtype=dtype))
    if case.input_grad:
        results["input.grad"] = x.grad
    for name in case.requested_params():
        results[name + ".grad"] = params[name].grad
    results = {k: v.detach().numpy() for k, v in results.items()}
    return results, activation_inputs


def conditioning_problem(case: Case, arrays) -> Optional[str]:
    """Why this draw is not a good reference, or None if it is."""
    single, single_activation_inputs = run(case, arrays, torch.float32)
    double, activation_inputs = run(case, arrays, torch.float64)
    for key, exact in double.items():
        scale = max(1.0, float(np.max(np.abs(exact))))
        diff = float(np.max(np.abs(single[key].astype(np.float64) - exact)))
        if not diff <= CONDITIONING_TOLERANCE * scale:
            return "%s: float32 differs from float64 by %g (scale %g)" % (key, diff, scale)
    for index, ((op, x), (_, x_single)) in enumerate(
            zip(activation_inputs, single_activation_inputs)):
        if not op.has_kink():
            continue
        # Inputs that are exactly 0 in both precisions are structural (e.g. a window entirely
        # in the zero padding of a conv without bias): every implementation gets exactly 0
        # there, and the activation's derivative at 0 is tested as such.
        magnitude = x.abs()[(x != 0) | (x_single.double() != 0)]
        if magnitude.numel() == 0:
            continue
        if float(magnitude.min()) < KINK_MARGIN * float(magnitude.max()):
            return "activation %d (%s): input %g from the kink" % (index, op.kind,
                                                                  float(magnitude.min()))
    return None


def save(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, np.ascontiguousarray(array, dtype="<f4"), allow_pickle=False)


def write_case(case: Case, out_dir: str) -> None:
    output_shape(case)  # validates the spec
    for name in case.requested_params():
        if name not in case.parameter_names():
            raise ValueError("%s: no parameter %s" % (case.name, name))
    seed = case.base_seed()
    for attempt in range(MAX_ATTEMPTS):
        arrays = draw_arrays(case, seed + attempt)
        problem = conditioning_problem(case, arrays)
        if problem is None:
            seed += attempt
            break
    else:
        raise RuntimeError("%s: no well-conditioned draw in %d attempts (%s)" %
                           (case.name, MAX_ATTEMPTS, problem))
    results, _ = run(case, arrays, torch.float32)

    case_dir = os.path.join(out_dir, case.name)
    if os.path.exists(case_dir):
        shutil.rmtree(case_dir)
    os.makedirs(case_dir)
    with open(os.path.join(case_dir, "case.txt"), "w") as f:
        f.write("# %s\n" % case.description)
        f.write("# input %s, parameters %s, torch.manual_seed(%d)\n" %
                (list(case.input_shape), case.init, seed))
        for line in case.spec_lines():
            f.write(line + "\n")
    save(os.path.join(case_dir, "input.npy"), arrays["input"])
    for name in case.parameter_names():
        save(os.path.join(case_dir, "params", name + ".npy"), arrays[name])
    for key in ("target", "grad_output"):
        if key in arrays:
            save(os.path.join(case_dir, key + ".npy"), arrays[key])
    for key, value in results.items():
        save(os.path.join(case_dir, "expected", key + ".npy"), value)


def committed_cases() -> List[Case]:
    cases = [
        # The three demos of the seed notebook, with its shapes and plain randn values.
        Case("seed_conv1", "seed notebook: one 3x3 conv, padding 1, no bias, MSE",
             (1, 1, 28, 28), [("conv1", conv(1, 8, 3, padding=1, bias=False))],
             init="randn"),
        Case("seed_conv4", "seed notebook: conv 1-8-16-32-64, ReLU after each, no bias, MSE",
             (1, 1, 28, 28), [
                 ("conv1", conv(1, 8, 3, padding=1, bias=False)), ("relu1", act("relu")),
                 ("conv2", conv(8, 16, 3, padding=1, bias=False)), ("relu2", act("relu")),
                 ("conv3", conv(16, 32, 3, padding=1, bias=False)), ("relu3", act("relu")),
                 ("conv4", conv(32, 64, 3, padding=1, bias=False)), ("relu4", act("relu"))
             ],
             init="randn"),
        Case("seed_layer", "seed notebook: Conv2D(1, 8, 3) with bias, padding 0, MSE",
             (1, 1, 28, 28), [("conv1", conv(1, 8, 3))], init="randn"),
        # Varied configurations.
        Case("batch3_bias_relu", "batch 3, 5->7 channels, bias, relu", (3, 5, 9, 9),
             [("conv1", conv(5, 7, 3, padding=1)), ("act1", act("relu"))]),
        Case("batch4_pointwise_17ch", "batch 4, 1x1 conv 3->17, tanh, sum objective",
             (4, 3, 5, 6), [("conv1", conv(3, 17, 1)), ("act1", act("tanh"))],
             objective="sum"),
        Case("groups3_tanh_sum", "groups=3 (6->9), bias, tanh, sum objective, H != W",
             (2, 6, 8, 10), [("conv1", conv(6, 9, 3, padding=1, groups=3)),
                             ("act1", act("tanh"))],
             objective="sum"),
        Case("depthwise_pointwise_sigmoid",
             "depthwise 3x3 (groups=4) then 1x1 4->6, sigmoid; weight grads only",
             (2, 4, 7, 7), [("dw", conv(4, 4, 3, padding=1, groups=4, bias=False)),
                            ("pw", conv(4, 6, 1)), ("act", act("sigmoid"))],
             param_grads=["dw.weight", "pw.weight"]),
        Case("depthwise_multiplier_gelu",
             "depthwise with channel multiplier 2 (3->6, groups=3), 5x5, gelu, grad_output",
             (1, 3, 9, 8), [("conv1", conv(3, 6, 5, padding=2, groups=3)),
                            ("act1", act("gelu"))],
             objective="grad_output"),
        Case("stride2_odd_input", "stride 2 on an odd 11x11 input, padding 1, relu",
             (2, 3, 11, 11), [("conv1", conv(3, 5, 3, stride=2, padding=1)),
                              ("act1", act("relu"))]),
        Case("stride3x2_kernel4x3", "stride 3,2, kernel 4x3, no bias, elu",
             (1, 2, 13, 10), [("conv1", conv(2, 4, (4, 3), stride=(3, 2), bias=False)),
                              ("act1", act("elu"))]),
        Case("stride3_kernel2_gaps",
             "stride 3 > kernel 2: some inputs get no gradient; padding 1, leaky_relu",
             (2, 2, 10, 9), [("conv1", conv(2, 3, 2, stride=3, padding=1)),
                             ("act1", act("leaky_relu", 0.2))]),
        Case("asym_padding_leaky",
             "asymmetric padding top=0 bottom=2 left=1 right=0, leaky_relu 0.2",
             (2, 3, 7, 9), [("conv1", conv(3, 4, 3, padding=(0, 2, 1, 0))),
                            ("act1", act("leaky_relu", 0.2))]),
        Case("asym_padding_stride2", "asymmetric padding 2,1,0,3 with stride 2, sigmoid, sum",
             (1, 4, 8, 7), [("conv1", conv(4, 2, (3, 4), stride=2, padding=(2, 1, 0, 3))),
                            ("act1", act("sigmoid"))],
             objective="sum"),
        Case("dilation2_elu_sum", "dilation 2, padding 2, elu alpha 1.0, sum objective",
             (2, 3, 9, 9), [("conv1", conv(3, 4, 3, padding=2, dilation=2)),
                            ("act1", act("elu", 1.0))],
             objective="sum"),
        Case("dilation3x2_rect_gelu_tanh", "dilation 3,2 with kernel 3x2, gelu tanh, H != W",
             (1, 2, 12, 8), [("conv1", conv(2, 5, (3, 2), padding=(1, 2), dilation=(3, 2))),
                             ("act1", act("gelu_tanh"))]),
        Case("kernel1x5_grad_output", "kernel 1x5, padding 0,0,2,2, tanh, grad_output",
             (2, 3, 6, 10), [("conv1", conv(3, 4, (1, 5), padding=(0, 0, 2, 2))),
                             ("act1", act("tanh"))],
             objective="grad_output"),
        Case("kernel5x2_tall", "kernel 5x2, no padding, 12x7 input, no bias, sigmoid",
             (1, 3, 12, 7), [("conv1", conv(3, 3, (5, 2), bias=False)),
                             ("act1", act("sigmoid"))]),
        Case("kernel_covers_input", "5x5 kernel over a 5x5 input: 1x1 output, batch 3",
             (3, 2, 5, 5), [("conv1", conv(2, 6, 5))]),
        Case("chain2_leaky_no_input_grad",
             "conv-leaky_relu(0.01)-conv, no input gradient", (2, 3, 8, 8),
             [("conv1", conv(3, 5, 3, padding=1)), ("act1", act("leaky_relu")),
              ("conv2", conv(5, 2, 3))],
             input_grad=False),
        Case("chain3_elu_sigmoid_sum",
             "conv-elu(0.5)-conv(stride 2)-sigmoid-conv, sum, some weights only",
             (1, 2, 12, 11), [("conv1", conv(2, 6, 3, padding=1)), ("act1", act("elu", 0.5)),
                              ("conv2", conv(6, 6, 3, stride=2, groups=2, bias=False)),
                              ("act2", act("sigmoid")), ("conv3", conv(6, 3, 1))],
             objective="sum", param_grads=["conv1.weight", "conv3.weight", "conv3.bias"]),
        Case("chain4_mixed_mse",
             "conv-gelu-conv(groups 2)-tanh-conv(stride 2, dilation 2)-relu-conv, MSE",
             (2, 2, 14, 13), [
                 ("conv1", conv(2, 4, 3, padding=1)), ("act1", act("gelu")),
                 ("conv2", conv(4, 6, 3, padding=(1, 0, 0, 1), groups=2)),
                 ("act2", act("tanh")),
                 ("conv3", conv(6, 5, 3, stride=2, padding=2, dilation=2, bias=False)),
                 ("act3", act("relu")), ("conv4", conv(5, 3, (2, 3)))
             ]),
        Case("chain4_activations_grad_output",
             "conv then stacked activations gelu_tanh-leaky_relu-elu, grad_output",
             (2, 3, 6, 7), [("conv1", conv(3, 4, 3, padding=1)), ("act1", act("gelu_tanh")),
                            ("act2", act("leaky_relu", 0.1)), ("act3", act("elu", 1.5))],
             objective="grad_output"),
        Case("forward_only_request", "no gradients requested: output and loss only",
             (1, 3, 6, 6), [("conv1", conv(3, 4, 3)), ("act1", act("tanh"))],
             input_grad=False, param_grads="none"),
        Case("input_grad_only", "input gradient only, two convs, grad_output",
             (2, 2, 7, 6), [("conv1", conv(2, 3, 3, padding=1)), ("act1", act("sigmoid")),
                            ("conv2", conv(3, 2, 2, stride=2))],
             objective="grad_output", param_grads="none"),
        Case("bias_grads_only", "only the bias gradients of two layers, sum objective",
             (2, 3, 6, 6), [("conv1", conv(3, 4, 3)), ("act1", act("gelu")),
                            ("conv2", conv(4, 5, 2))],
             objective="sum", input_grad=False, param_grads=["conv2.bias", "conv1.bias"]),
    ]
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "duplicate case names"
    return cases


def divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def random_case(rng: random.Random, name: str) -> Case:
    """A random valid configuration; small enough to run in well under a second."""
    while True:
        n, c = rng.randint(1, 3), rng.randint(1, 6)
        h, w = rng.randint(5, 14), rng.randint(5, 14)
        layers: List[Tuple[str, Op]] = []
        cur_c, cur_h, cur_w = c, h, w
        ok = True
        for index in range(rng.randint(1, 3)):
            out_c = rng.randint(1, 8)
            groups = rng.choice(divisors(cur_c))
            out_c = max(groups, out_c // groups * groups)
            kernel = (rng.randint(1, 4), rng.randint(1, 4))
            stride = (rng.randint(1, 3), rng.randint(1, 3))
            dilation = (rng.choice([1, 1, 2, 3]), rng.choice([1, 1, 2, 3]))
            padding = tuple(rng.randint(0, 2) for _ in range(4))
            op = Conv2d(cur_c, out_c, kernel, stride, padding, dilation, groups,
                        rng.random() < 0.6)
            cur_h = conv_output_size(cur_h, kernel[0], stride[0], padding[0], padding[1],
                                     dilation[0])
            cur_w = conv_output_size(cur_w, kernel[1], stride[1], padding[2], padding[3],
                                     dilation[1])
            if cur_h < 1 or cur_w < 1:
                ok = False
                break
            cur_c = out_c
            layers.append(("conv%d" % (index + 1), op))
            if rng.random() < 0.8:
                kind = rng.choice(ACTIVATIONS)
                alpha = None
                if kind == "leaky_relu":
                    alpha = rng.choice([0.01, 0.1, 0.2])
                elif kind == "elu":
                    alpha = rng.choice([0.5, 1.0, 1.5])
                layers.append(("act%d" % (index + 1), act(kind, alpha)))
        if not ok:
            continue
        case = Case(name, "random configuration", (n, c, h, w), layers,
                    objective=rng.choice(OBJECTIVES), input_grad=rng.random() < 0.75,
                    seed=rng.randrange(2**31))
        params = case.parameter_names()
        choice = rng.random()
        if choice < 0.5:
            case.param_grads = "all"
        elif choice < 0.6:
            case.param_grads = "none"
        else:
            subset = [p for p in params if rng.random() < 0.5]
            case.param_grads = subset if subset else "none"
        return case


def live_cases(seed: int, count: int) -> List[Case]:
    committed = {tuple(c.spec_lines()) for c in committed_cases()}
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        case = random_case(rng, "live_%d_%02d" % (seed, len(cases)))
        if tuple(case.spec_lines()) not in committed:
            cases.append(case)
    return cases


def remove_stale_cases(out_dir: str, keep: List[str]) -> None:
    for entry in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, entry)
        if (entry not in keep and os.path.isdir(path) and
                os.path.exists(os.path.join(path, "case.txt"))):
            shutil.rmtree(path)


def main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="output directory")
    parser.add_argument("--live", action="store_true",
                        help="write random configurations instead of the committed cases")
    parser.add_argument("--seed", type=int, help="--live: seed of the configurations")
    parser.add_argument("--count", type=int, default=5, help="--live: number of cases")
    args = parser.parse_args(argv)

    if args.live:
        if args.out is None or args.seed is None:
            parser.error("--live needs --out and --seed")
        if args.count < 1:
            parser.error("--count must be positive")
        cases = live_cases(args.seed, args.count)
        out_dir = args.out
    else:
        cases = committed_cases()
        out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                           os.pardir, "fixtures")
    out_dir = os.path.normpath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    remove_stale_cases(out_dir, [c.name for c in cases])
    for case in cases:
        write_case(case, out_dir)
        print("wrote", os.path.join(out_dir, case.name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
