#!/usr/bin/python3
"""Writes PyTorch reference cases for the gradient engine's tests.

Each case is a directory holding the network spec (case.txt), its inputs and parameters and
what PyTorch computes for them (output, loss, gradients), all as float32 .npy files. The
format is read by tests/torch/fixture.cc; see tests/fixtures/README.md.

PyTorch runs in float32 on its native CPU kernels (oneDNN disabled, one thread), following
torch.nn.functional semantics. Every case is also run in float64; a case is kept only if
its float32 results agree with float64 to a tenth of the tests' tolerance, no input of a
kinked activation (relu, leaky_relu, elu with alpha != 1) lies so close to the kink that
rounding could move it across, and no max-pooling window has a runner-up so close to its
maximum that rounding could change which element wins. Otherwise the case is redrawn from
the next seed, so the stored values are well conditioned for any correct float32
implementation.

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
OBJECTIVES = ("mse", "sum", "grad_output")  # drawn by --live; cross_entropy is committed only


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


@dataclasses.dataclass(frozen=True)
class MaxPool2d:
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int] = (0, 0)  # each side of H, of W
    dilation: Tuple[int, int] = (1, 1)
    ceil_mode: bool = False

    def spec(self) -> str:
        return ("max_pool2d kernel=%d,%d stride=%d,%d padding=%d,%d dilation=%d,%d "
                "ceil_mode=%d" % (*self.kernel, *self.stride, *self.padding, *self.dilation,
                                  int(self.ceil_mode)))


@dataclasses.dataclass(frozen=True)
class AvgPool2d:
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int] = (0, 0)
    ceil_mode: bool = False
    count_include_pad: bool = True

    def spec(self) -> str:
        return ("avg_pool2d kernel=%d,%d stride=%d,%d padding=%d,%d ceil_mode=%d "
                "count_include_pad=%d" % (*self.kernel, *self.stride, *self.padding,
                                          int(self.ceil_mode), int(self.count_include_pad)))


@dataclasses.dataclass(frozen=True)
class BatchNorm2d:
    num_features: int
    eps: float = 1e-5
    momentum: float = 0.1
    affine: bool = True
    training: bool = True
    # Whether the case gives "<name>.running_mean" and "<name>.running_var" (params/); if not,
    # PyTorch's initial 0 and 1 apply. Inference mode needs them.
    running_stats: bool = True

    def spec(self) -> str:
        return ("batch_norm2d num_features=%d eps=%r momentum=%r affine=%d training=%d "
                "running_stats=%d" % (self.num_features, self.eps, self.momentum,
                                      int(self.affine), int(self.training),
                                      int(self.running_stats)))


@dataclasses.dataclass(frozen=True)
class Linear:
    in_features: int
    out_features: int
    bias: bool = True

    def spec(self) -> str:
        return "linear in_features=%d out_features=%d bias=%d" % (
            self.in_features, self.out_features, int(self.bias))


@dataclasses.dataclass(frozen=True)
class Add:
    other: str  # an earlier layer's name, or NETWORK_INPUT

    def spec(self) -> str:
        return "add other=" + self.other


Op = Union[Conv2d, Activation, MaxPool2d, AvgPool2d, BatchNorm2d, Linear, Add]

# What a layer's `input` or an add's `other` calls the network's input (kNetworkInput).
NETWORK_INPUT = "input"


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer line: its name, op and what it reads (None: the previous layer's output)."""
    name: str
    op: Op
    input: Optional[str] = None

    def spec(self) -> str:
        line = "layer %s %s" % (self.name, self.op.spec())
        if self.input is not None:
            line += " input=" + self.input
        return line


def parameter_infos(layer: Layer) -> List[Tuple[str, bool]]:
    """(name, trainable) of the parameters and buffers the case gives for `layer`, in
    PyTorch's order (gradengine::LayerParameters, less the optional buffers left out)."""
    op = layer.op
    infos = []
    if isinstance(op, (Conv2d, Linear)):
        infos.append((layer.name + ".weight", True))
        if op.bias:
            infos.append((layer.name + ".bias", True))
    elif isinstance(op, BatchNorm2d):
        if op.affine:
            infos += [(layer.name + ".weight", True), (layer.name + ".bias", True)]
        if op.running_stats:
            infos += [(layer.name + ".running_mean", False), (layer.name + ".running_var", False)]
    return infos


@dataclasses.dataclass
class Case:
    name: str
    description: str
    input_shape: Tuple[int, int, int, int]
    # (name, op) for a layer reading the previous layer's output, or a Layer.
    layers: List[Union[Tuple[str, Op], Layer]]
    # "mse", "sum", "grad_output" or "cross_entropy" (labels [N] or [N, H, W]).
    objective: str = "mse"
    label_smoothing: float = 0.0
    ignore_index: int = -100
    # The fraction of labels drawn as ignore_index (at least one is, and not all).
    ignored_labels: float = 0.0
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

    def layer_list(self) -> List[Layer]:
        return [l if isinstance(l, Layer) else Layer(*l) for l in self.layers]

    def parameter_names(self) -> List[str]:
        """The learnable parameters, in layer order."""
        return [name for layer in self.layer_list()
                for name, trainable in parameter_infos(layer) if trainable]

    def buffer_names(self) -> List[str]:
        """The running statistics the case gives, in layer order."""
        return [name for layer in self.layer_list()
                for name, trainable in parameter_infos(layer) if not trainable]

    def requested_params(self) -> List[str]:
        if self.param_grads == "all":
            return self.parameter_names()
        if self.param_grads == "none":
            return []
        return list(self.param_grads)

    def spec_lines(self) -> List[str]:
        lines = [layer.spec() for layer in self.layer_list()]
        if self.objective == "cross_entropy":
            lines.append("objective cross_entropy label_smoothing=%r ignore_index=%d" %
                         (self.label_smoothing, self.ignore_index))
        else:
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


def pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def max_pool(kernel, stride=None, padding=0, dilation=1, ceil_mode=False) -> MaxPool2d:
    """F.max_pool2d's arguments; stride defaults to the kernel, as in PyTorch."""
    return MaxPool2d(pair(kernel), pair(kernel if stride is None else stride), pair(padding),
                     pair(dilation), ceil_mode)


def avg_pool(kernel, stride=None, padding=0, ceil_mode=False,
             count_include_pad=True) -> AvgPool2d:
    return AvgPool2d(pair(kernel), pair(kernel if stride is None else stride), pair(padding),
                     ceil_mode, count_include_pad)


def conv_output_size(size, kernel, stride, pad_begin, pad_end, dilation) -> int:
    span = dilation * (kernel - 1) + 1
    return (size + pad_begin + pad_end - span) // stride + 1


def pool_output_size(size, kernel, stride, pad, dilation, ceil_mode) -> int:
    """PyTorch's pooling output size (aten/src/ATen/native/Pool.h, pooling_output_shape)."""
    span = dilation * (kernel - 1) + 1
    out = (size + 2 * pad - span + (stride - 1 if ceil_mode else 0)) // stride + 1
    # With ceil_mode, the last window must start inside the input or the left padding.
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def layer_shapes(case: Case) -> Dict[str, Tuple[int, ...]]:
    """Every layer's output shape by name (NETWORK_INPUT: the input's); checks the spec."""
    shapes = {NETWORK_INPUT: tuple(case.input_shape)}
    shape = tuple(case.input_shape)

    def fail(layer, message):
        raise ValueError("%s: layer %s: %s" % (case.name, layer.name, message))

    for layer in case.layer_list():
        op = layer.op
        if layer.name in shapes:
            fail(layer, "name repeated or reserved")
        if layer.input is not None:
            if layer.input not in shapes:
                fail(layer, "input %s is not an earlier layer" % layer.input)
            shape = shapes[layer.input]
        if isinstance(op, (Conv2d, MaxPool2d, AvgPool2d, BatchNorm2d)) and len(shape) != 4:
            fail(layer, "needs an NCHW input, got %s" % (shape,))
        if isinstance(op, Conv2d):
            n, c, h, w = shape
            if c != op.in_channels:
                fail(layer, "in_channels %d != %d" % (op.in_channels, c))
            h = conv_output_size(h, op.kernel[0], op.stride[0], op.padding[0], op.padding[1],
                                 op.dilation[0])
            w = conv_output_size(w, op.kernel[1], op.stride[1], op.padding[2], op.padding[3],
                                 op.dilation[1])
            shape = (n, op.out_channels, h, w)
        elif isinstance(op, (MaxPool2d, AvgPool2d)):
            n, c, h, w = shape
            dilation = op.dilation if isinstance(op, MaxPool2d) else (1, 1)
            shape = (n, c) + tuple(
                pool_output_size(size, op.kernel[i], op.stride[i], op.padding[i], dilation[i],
                                 op.ceil_mode) for i, size in enumerate((h, w)))
        elif isinstance(op, BatchNorm2d):
            if shape[1] != op.num_features:
                fail(layer, "num_features %d != %d" % (op.num_features, shape[1]))
            if not op.training and not op.running_stats:
                fail(layer, "inference mode needs the running statistics")
        elif isinstance(op, Linear):
            features = int(np.prod(shape[1:]))
            if features != op.in_features:
                fail(layer, "in_features %d != %d" % (op.in_features, features))
            shape = (shape[0], op.out_features)
        elif isinstance(op, Add):
            if op.other not in shapes:
                fail(layer, "other %s is not an earlier layer" % op.other)
            if shapes[op.other] != shape:
                fail(layer, "shape %s != other's %s" % (shape, shapes[op.other]))
        if min(shape) < 1:
            fail(layer, "empty output %s" % (shape,))
        shapes[layer.name] = shape
    if case.objective == "cross_entropy" and len(shape) not in (2, 4):
        raise ValueError("%s: cross_entropy needs [N, C] or [N, C, H, W] logits" % case.name)
    return shapes


def output_shape(case: Case) -> Tuple[int, ...]:
    return layer_shapes(case)[case.layer_list()[-1].name]


def draw_arrays(case: Case, seed: int) -> Dict[str, np.ndarray]:
    """Draws input, parameters and objective tensor, in the seed notebook's order (then each
    layer's parameters and buffers in layer order, then the objective's tensor or labels)."""
    torch.manual_seed(seed)
    arrays = {"input": torch.randn(*case.input_shape)}
    for layer in case.layer_list():
        op = layer.op
        if isinstance(op, (Conv2d, Linear)):
            if isinstance(op, Conv2d):
                fan_in = (op.in_channels // op.groups) * op.kernel[0] * op.kernel[1]
                weight = torch.randn(op.out_channels, op.in_channels // op.groups, *op.kernel)
                out_features = op.out_channels
            else:
                fan_in = op.in_features
                weight = torch.randn(op.out_features, op.in_features)
                out_features = op.out_features
            if case.init == "scaled":
                weight = weight / float(np.sqrt(fan_in))
            arrays[layer.name + ".weight"] = weight
            if op.bias:
                bias = torch.randn(out_features)
                if case.init == "scaled":
                    bias = bias * 0.5
                arrays[layer.name + ".bias"] = bias
        elif isinstance(op, BatchNorm2d):
            if op.affine:
                # Scales away from 0, so that every channel's gradient matters.
                arrays[layer.name + ".weight"] = 1.0 + 0.25 * torch.randn(op.num_features)
                arrays[layer.name + ".bias"] = 0.5 * torch.randn(op.num_features)
            if op.running_stats:
                arrays[layer.name + ".running_mean"] = 0.5 * torch.randn(op.num_features)
                arrays[layer.name + ".running_var"] = 0.5 + torch.rand(op.num_features)
    if case.objective == "mse":
        arrays["target"] = torch.randn(*output_shape(case))
    elif case.objective == "grad_output":
        arrays["grad_output"] = torch.randn(*output_shape(case))
    arrays = {k: v.numpy().astype(np.float32) for k, v in arrays.items()}
    if case.objective == "cross_entropy":
        logits_shape = output_shape(case)
        labels_shape = (logits_shape[0],) + tuple(logits_shape[2:])
        labels = torch.randint(0, logits_shape[1], labels_shape, dtype=torch.int64)
        if case.ignored_labels > 0:
            labels[torch.rand(labels_shape) < case.ignored_labels] = case.ignore_index
        arrays["labels"] = labels.numpy().astype(np.int64)
    return arrays


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


@dataclasses.dataclass
class Probe:
    """The input of a layer with a kink (a kinked activation, a max pool), for the
    conditioning checks."""
    op: Op
    x: torch.Tensor
    # Whether x is a relu's output, whose exact zeros get no gradient whichever wins a tie.
    after_relu: bool = False


def run(case: Case, arrays: Dict[str, np.ndarray], dtype):
    """Returns (results by file stem, [Probe])."""
    requested = set(case.requested_params())
    x = torch.tensor(arrays["input"], dtype=dtype, requires_grad=case.input_grad)
    params = {
        name: torch.tensor(arrays[name], dtype=dtype, requires_grad=name in requested)
        for name in case.parameter_names()
    }
    # Copies: batch norm in training mode updates them in place.
    buffers = {name: torch.tensor(arrays[name], dtype=dtype) for name in case.buffer_names()}
    outputs = {NETWORK_INPUT: x}
    ops = {}
    running_stats = {}
    y = x
    source = NETWORK_INPUT
    probes = []
    for layer in case.layer_list():
        op = layer.op
        if layer.input is not None:
            source = layer.input
            y = outputs[source]
        if isinstance(op, Conv2d):
            y = apply_conv(op, y, params[layer.name + ".weight"],
                           params.get(layer.name + ".bias"))
        elif isinstance(op, Activation):
            probes.append(Probe(op, y.detach().clone()))
            y = apply_activation(op, y)
        elif isinstance(op, MaxPool2d):
            source_op = ops.get(source)
            probes.append(Probe(op, y.detach().clone(),
                                isinstance(source_op, Activation) and source_op.kind == "relu"))
            y = F.max_pool2d(y, op.kernel, op.stride, op.padding, op.dilation,
                             ceil_mode=op.ceil_mode)
        elif isinstance(op, AvgPool2d):
            y = F.avg_pool2d(y, op.kernel, op.stride, op.padding, ceil_mode=op.ceil_mode,
                             count_include_pad=op.count_include_pad)
        elif isinstance(op, BatchNorm2d):
            mean = buffers.get(layer.name + ".running_mean",
                               torch.zeros(op.num_features, dtype=dtype))
            var = buffers.get(layer.name + ".running_var",
                              torch.ones(op.num_features, dtype=dtype))
            y = F.batch_norm(y, mean, var, params.get(layer.name + ".weight"),
                             params.get(layer.name + ".bias"), training=op.training,
                             momentum=op.momentum, eps=op.eps)
            if op.training:
                running_stats[layer.name + ".running_mean"] = mean
                running_stats[layer.name + ".running_var"] = var
        elif isinstance(op, Linear):
            y = F.linear(torch.flatten(y, 1), params[layer.name + ".weight"],
                         params.get(layer.name + ".bias"))
        elif isinstance(op, Add):
            y = y + outputs[op.other]
        else:
            raise ValueError("unknown op %r" % (op,))
        outputs[layer.name] = y
        ops[layer.name] = op
        source = layer.name
    assert tuple(y.shape) == output_shape(case), (case.name, tuple(y.shape))

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
    elif case.objective == "cross_entropy":
        loss = F.cross_entropy(y, torch.tensor(arrays["labels"]), ignore_index=case.ignore_index,
                               label_smoothing=case.label_smoothing)
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
    results.update(running_stats)
    results = {k: v.detach().numpy() for k, v in results.items()}
    return results, probes


def pool_windows(op: MaxPool2d, x: torch.Tensor) -> torch.Tensor:
    """The values each output of F.max_pool2d(x) is the maximum of: [K, windows], with -inf
    for the padding and for the part of a ceil_mode window beyond it."""
    n, c, h, w = x.shape
    out = [pool_output_size(size, op.kernel[i], op.stride[i], op.padding[i], op.dilation[i],
                            op.ceil_mode) for i, size in enumerate((h, w))]
    # The padded extent the windows cover, at least the input with its padding.
    extent = [max(size + 2 * op.padding[i],
                  (out[i] - 1) * op.stride[i] + op.dilation[i] * (op.kernel[i] - 1) + 1)
              for i, size in enumerate((h, w))]
    padded = F.pad(x.reshape(n * c, 1, h, w),
                   (op.padding[1], extent[1] - w - op.padding[1], op.padding[0],
                    extent[0] - h - op.padding[0]), value=-float("inf"))
    columns = F.unfold(padded, op.kernel, dilation=op.dilation, stride=op.stride)
    counts = [(extent[i] - op.dilation[i] * (op.kernel[i] - 1) - 1) // op.stride[i] + 1
              for i in range(2)]
    k = op.kernel[0] * op.kernel[1]
    columns = columns.reshape(n * c, k, counts[0], counts[1])[:, :, :out[0], :out[1]]
    return columns.permute(1, 0, 2, 3).reshape(k, -1)


def max_pool_tie(probe: Probe) -> Optional[str]:
    """Why some window's maximum is not clearly ahead of its runner-up, or None."""
    windows = pool_windows(probe.op, probe.x)
    if windows.shape[0] < 2:
        return None
    ordered = torch.sort(windows, dim=0, descending=True).values
    top, runner_up = ordered[0], ordered[1]
    gap = top - runner_up  # +inf where only one element is not padding
    if probe.after_relu:
        # All-zero windows: whichever zero wins, relu passes it no gradient.
        gap = torch.where(top == 0, torch.full_like(gap, float("inf")), gap)
    scale = float(probe.x.abs().max())
    if float(gap.min()) < KINK_MARGIN * scale:
        return "max pool: runner-up %g from the maximum" % float(gap.min())
    return None


def conditioning_problem(case: Case, arrays) -> Optional[str]:
    """Why this draw is not a good reference, or None if it is."""
    if case.objective == "cross_entropy" and case.ignored_labels > 0:
        ignored = int(np.sum(arrays["labels"] == case.ignore_index))
        if ignored == 0 or ignored == arrays["labels"].size:
            return "labels: %d of %d ignored" % (ignored, arrays["labels"].size)
    single, single_probes = run(case, arrays, torch.float32)
    double, probes = run(case, arrays, torch.float64)
    for key, exact in double.items():
        scale = max(1.0, float(np.max(np.abs(exact))))
        diff = float(np.max(np.abs(single[key].astype(np.float64) - exact)))
        if not diff <= CONDITIONING_TOLERANCE * scale:
            return "%s: float32 differs from float64 by %g (scale %g)" % (key, diff, scale)
    activation_index = 0
    for probe, single_probe in zip(probes, single_probes):
        if isinstance(probe.op, MaxPool2d):
            for p in (probe, single_probe):
                problem = max_pool_tie(p)
                if problem is not None:
                    return problem
            continue
        op, x, x_single = probe.op, probe.x, single_probe.x
        index = activation_index
        activation_index += 1
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


def save_labels(path: str, array: np.ndarray) -> None:
    np.save(path, np.ascontiguousarray(array, dtype="<i8"), allow_pickle=False)


def write_case(case: Case, out_dir: str) -> None:
    layer_shapes(case)  # validates the spec
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
    for name in case.parameter_names() + case.buffer_names():
        save(os.path.join(case_dir, "params", name + ".npy"), arrays[name])
    for key in ("target", "grad_output"):
        if key in arrays:
            save(os.path.join(case_dir, key + ".npy"), arrays[key])
    if "labels" in arrays:
        save_labels(os.path.join(case_dir, "labels.npy"), arrays["labels"])
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
        # Pooling, batch norm, linear layers, residual connections and cross-entropy.
        Case("lenet5_cross_entropy",
             "LeNet-5: conv 5x5 (pad 2)-relu-maxpool 2-conv 5x5-relu-maxpool 2-linear 400-120-"
             "relu-linear 120-84-relu-linear 84-10, cross-entropy", (4, 1, 28, 28), [
                 ("conv1", conv(1, 6, 5, padding=2)), ("relu1", act("relu")),
                 ("pool1", max_pool(2)),
                 ("conv2", conv(6, 16, 5)), ("relu2", act("relu")), ("pool2", max_pool(2)),
                 ("fc1", Linear(400, 120)), ("relu3", act("relu")),
                 ("fc2", Linear(120, 84)), ("relu4", act("relu")),
                 ("fc3", Linear(84, 10)),
             ],
             objective="cross_entropy"),
        Case("resnet_basic_block",
             "ResNet basic block: conv3x3-bn-relu-conv3x3-bn, add the block input, relu; batch "
             "norm training with given running stats, MSE", (2, 4, 8, 8), [
                 ("conv1", conv(4, 4, 3, padding=1, bias=False)), ("bn1", BatchNorm2d(4)),
                 ("relu1", act("relu")),
                 ("conv2", conv(4, 4, 3, padding=1, bias=False)), ("bn2", BatchNorm2d(4)),
                 ("add", Add(NETWORK_INPUT)), ("relu2", act("relu")),
             ]),
        Case("resnet_downsample_block",
             "ResNet downsampling block: stride-2 conv3x3-bn-relu-conv3x3-bn plus a 1x1 stride-2 "
             "projection of the input (input=input) and bn, add, relu; running stats default",
             (2, 4, 8, 8), [
                 ("conv1", conv(4, 8, 3, stride=2, padding=1, bias=False)),
                 ("bn1", BatchNorm2d(8, running_stats=False)), ("relu1", act("relu")),
                 ("conv2", conv(8, 8, 3, padding=1, bias=False)),
                 ("bn2", BatchNorm2d(8, running_stats=False)),
                 Layer("proj", conv(4, 8, 1, stride=2, bias=False), input=NETWORK_INPUT),
                 ("proj_bn", BatchNorm2d(8, running_stats=False)),
                 ("add", Add("bn2")), ("relu2", act("relu")),
             ]),
        Case("max_pool_ceil_pad_dilation",
             "max pool on the input: kernel 3x2, stride 2,3, padding 1,0, dilation 2,1, ceil_mode "
             "(last windows overhang the input), MSE", (2, 3, 10, 10),
             [("pool1", max_pool((3, 2), stride=(2, 3), padding=(1, 0), dilation=(2, 1),
                                 ceil_mode=True))]),
        Case("max_pool_overlap_conv",
             "conv then max pool 3x3 stride 2 padding 1 (overlapping windows sum gradients), "
             "grad_output", (2, 2, 9, 8),
             [("conv1", conv(2, 3, 3, padding=1)), ("pool1", max_pool(3, stride=2, padding=1))],
             objective="grad_output"),
        Case("avg_pool_ceil_pad_include",
             "avg pool 3x3 stride 2 padding 1, ceil_mode, count_include_pad=1: the divisor "
             "counts the padding but not the overhang past it, MSE", (2, 3, 8, 6),
             [("pool1", avg_pool(3, stride=2, padding=1, ceil_mode=True,
                                 count_include_pad=True))]),
        Case("avg_pool_ceil_pad_exclude",
             "avg pool 3x3 stride 2 padding 1, ceil_mode, count_include_pad=0: the divisor "
             "counts input elements only, MSE", (2, 3, 8, 6),
             [("pool1", avg_pool(3, stride=2, padding=1, ceil_mode=True,
                                 count_include_pad=False))]),
        Case("batch_norm_train_running_stats",
             "conv-batch norm (training, eps 1e-3, momentum 0.2, given running stats: their "
             "update is checked)-tanh, MSE", (3, 4, 5, 6), [
                 ("conv1", conv(4, 5, 3, padding=1)),
                 ("bn1", BatchNorm2d(5, eps=1e-3, momentum=0.2)), ("act1", act("tanh")),
             ]),
        Case("batch_norm_train_default_stats",
             "batch norm on the input (training, no affine, running stats not given: from 0 "
             "and 1)-conv 1x1-gelu, grad_output", (4, 3, 4, 5), [
                 ("bn1", BatchNorm2d(3, affine=False, running_stats=False)),
                 ("conv1", conv(3, 4, 1)), ("act1", act("gelu")),
             ],
             objective="grad_output"),
        Case("batch_norm_inference",
             "conv-batch norm (inference: normalises with the running stats, eps 1e-4)-relu, "
             "MSE", (2, 4, 5, 5), [
                 ("conv1", conv(4, 4, 3, padding=1, bias=False)),
                 ("bn1", BatchNorm2d(4, eps=1e-4, training=False)), ("act1", act("relu")),
             ]),
        Case("cross_entropy_smoothing_ignore",
             "linear 12->7 (no bias) on [6,3,2,2], cross-entropy on [N,C] logits with "
             "label_smoothing 0.1 and ignore_index -1", (6, 3, 2, 2),
             [("fc1", Linear(12, 7, bias=False))],
             objective="cross_entropy", label_smoothing=0.1, ignore_index=-1,
             ignored_labels=0.3),
        Case("cross_entropy_per_pixel",
             "conv 1x1 3->5, per-pixel cross-entropy on [N,C,H,W] logits, label_smoothing 0.2, "
             "ignore_index 4 (a class index: class 4 still gets smoothing mass)", (2, 3, 4, 5),
             [("conv1", conv(3, 5, 1))],
             objective="cross_entropy", label_smoothing=0.2, ignore_index=4,
             ignored_labels=0.2),
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
