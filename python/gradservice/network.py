"""Networks as Python objects: the layers of grad.v1.Network, their parameters, and JSON.

A Network is an ordered list of named layers. Each layer class takes torch.nn's arguments with
torch.nn's defaults (note that Conv2d and Linear have bias=True, as in torch.nn, where the
proto's default is false), and converts to and from its grad.v1 message. A layer's `input`
names the earlier layer it reads (None: the previous one; "input": the network's input).

    net = Network([Conv2d("conv1", 1, 8, 3, padding=1), ReLU("relu1"),
                   MaxPool2d("pool1", 2), Linear("fc", 8 * 14 * 14, 10)])
    parameter_infos(net)   # conv1.weight [8, 1, 3, 3], conv1.bias [8], fc.weight, fc.bias

Network.from_json reads the protobuf JSON files `gradctl --net` reads. Checks here are of types
and of what the wire cannot express; whether a network fits its input is the server's call,
and its errors name the layer (layers[0].conv2d.in_channels=0 ...).
"""

import dataclasses
import json
import os
import typing

from google.protobuf import json_format
import numpy as np

from ._proto import gradient_service_pb2 as pb

NETWORK_INPUT = "input"  # the name by which `input` and Add.other refer to the network's input

_ACTIVATION_KINDS = {
    "relu": pb.RELU,
    "leaky_relu": pb.LEAKY_RELU,
    "tanh": pb.TANH,
    "sigmoid": pb.SIGMOID,
    "elu": pb.ELU,
    "gelu": pb.GELU,
    "gelu_tanh": pb.GELU_TANH,
}
_ACTIVATION_NAMES = {value: name for name, value in _ACTIVATION_KINDS.items()}
# torch.nn's defaults of the activations that take a parameter.
_DEFAULT_ALPHA = {"leaky_relu": 0.01, "elu": 1.0}


def _ints(value, what, counts):
    """`value` (an int or a sequence of ints) as a list of len in `counts`."""
    if isinstance(value, bool):
        raise TypeError(f"{what}: expected an int or a sequence of ints, got bool")
    if isinstance(value, int):
        return [value]
    try:
        values = list(value)
    except TypeError:
        raise TypeError(f"{what}: expected an int or a sequence of ints, "
                        f"got {type(value).__name__}") from None
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{what}: expected ints, got {type(v).__name__} {v!r}")
    if len(values) not in counts:
        raise ValueError(f"{what}={values} has {len(values)} values; expected "
                         f"{' or '.join(str(c) for c in counts)}")
    return values


def _pair(values):
    """[k] or [kh, kw] as (kh, kw)."""
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _unwrap(values, default):
    """A repeated int field as the int or tuple PyTorch would be given."""
    values = list(values)
    if not values:
        return default
    return values[0] if len(values) == 1 else tuple(values)


def _check_name(name, what):
    if not isinstance(name, str) or not name:
        raise TypeError(f"{what}: expected a non-empty str, got {name!r}")


@dataclasses.dataclass
class Conv2d:
    """torch.nn.Conv2d: weight [out_channels, in_channels / groups, kh, kw], bias [out_channels].

    kernel_size, stride and dilation are an int or (h, w); padding an int, (h, w) or
    (top, bottom, left, right) for asymmetric zero padding.
    """
    name: str
    in_channels: int
    out_channels: int
    kernel_size: typing.Any
    stride: typing.Any = 1
    padding: typing.Any = 0
    dilation: typing.Any = 1
    groups: int = 1
    bias: bool = True
    input: typing.Optional[str] = None

    def _fill(self, layer):
        conv = layer.conv2d
        conv.in_channels = self.in_channels
        conv.out_channels = self.out_channels
        conv.kernel_size.extend(_ints(self.kernel_size, f"{self.name}.kernel_size", (1, 2)))
        conv.stride.extend(_ints(self.stride, f"{self.name}.stride", (1, 2)))
        conv.padding.extend(_ints(self.padding, f"{self.name}.padding", (1, 2, 4)))
        conv.dilation.extend(_ints(self.dilation, f"{self.name}.dilation", (1, 2)))
        conv.groups = self.groups
        conv.bias = bool(self.bias)

    @classmethod
    def _from(cls, layer):
        c = layer.conv2d
        return cls(layer.name, c.in_channels, c.out_channels, _unwrap(c.kernel_size, 0),
                   _unwrap(c.stride, 1), _unwrap(c.padding, 0), _unwrap(c.dilation, 1),
                   c.groups or 1, c.bias, layer.input or None)

    def parameters(self):
        kh, kw = _pair(_ints(self.kernel_size, f"{self.name}.kernel_size", (1, 2)))
        groups = self.groups or 1
        infos = [ParameterInfo(f"{self.name}.weight",
                               (self.out_channels, self.in_channels // groups, kh, kw))]
        if self.bias:
            infos.append(ParameterInfo(f"{self.name}.bias", (self.out_channels,)))
        return infos

    def mixes_batch(self):
        return False


@dataclasses.dataclass
class Activation:
    """An elementwise activation: kind "relu", "leaky_relu" (alpha = negative_slope, default
    0.01), "tanh", "sigmoid", "elu" (alpha, default 1.0), "gelu" or "gelu_tanh"."""
    name: str
    kind: str = "relu"
    alpha: typing.Optional[float] = None
    input: typing.Optional[str] = None

    def _fill(self, layer):
        if self.kind not in _ACTIVATION_KINDS:
            raise ValueError(f"{self.name}.kind={self.kind!r} is not an activation; expected one "
                             f"of {', '.join(_ACTIVATION_KINDS)}")
        layer.activation.kind = _ACTIVATION_KINDS[self.kind]
        alpha = self.alpha if self.alpha is not None else _DEFAULT_ALPHA.get(self.kind)
        if alpha is not None:
            layer.activation.alpha = float(alpha)

    @classmethod
    def _from(cls, layer):
        kind = _ACTIVATION_NAMES.get(layer.activation.kind)
        if kind is None:
            raise ValueError(f"layer {layer.name!r}: activation kind {layer.activation.kind} is "
                             "not one this client knows")
        # The proto's alpha is a float32: read back as the shortest decimal that gives it, the
        # value it was most likely written from (0.2, not 0.20000000298).
        alpha = float(str(np.float32(layer.activation.alpha))) if kind in _DEFAULT_ALPHA else None
        return cls(layer.name, kind, alpha, layer.input or None)

    def parameters(self):
        return []

    def mixes_batch(self):
        return False


def ReLU(name, input=None):  # noqa: N802 -- named like torch.nn's class
    """torch.nn.ReLU."""
    return Activation(name, "relu", input=input)


def LeakyReLU(name, negative_slope=0.01, input=None):  # noqa: N802
    """torch.nn.LeakyReLU."""
    return Activation(name, "leaky_relu", negative_slope, input)


def Tanh(name, input=None):  # noqa: N802
    """torch.nn.Tanh."""
    return Activation(name, "tanh", input=input)


def Sigmoid(name, input=None):  # noqa: N802
    """torch.nn.Sigmoid."""
    return Activation(name, "sigmoid", input=input)


def ELU(name, alpha=1.0, input=None):  # noqa: N802
    """torch.nn.ELU."""
    return Activation(name, "elu", alpha, input)


def GELU(name, approximate="none", input=None):  # noqa: N802
    """torch.nn.GELU; approximate "none" or "tanh"."""
    kinds = {"none": "gelu", "tanh": "gelu_tanh"}
    if approximate not in kinds:
        raise ValueError(f"{name}.approximate={approximate!r}; expected 'none' or 'tanh'")
    return Activation(name, kinds[approximate], input=input)


@dataclasses.dataclass
class MaxPool2d:
    """torch.nn.MaxPool2d (stride None: the kernel size); padding at most half the kernel."""
    name: str
    kernel_size: typing.Any
    stride: typing.Any = None
    padding: typing.Any = 0
    dilation: typing.Any = 1
    ceil_mode: bool = False
    input: typing.Optional[str] = None

    def _fill(self, layer):
        pool = layer.max_pool2d
        pool.kernel_size.extend(_ints(self.kernel_size, f"{self.name}.kernel_size", (1, 2)))
        if self.stride is not None:
            pool.stride.extend(_ints(self.stride, f"{self.name}.stride", (1, 2)))
        pool.padding.extend(_ints(self.padding, f"{self.name}.padding", (1, 2)))
        pool.dilation.extend(_ints(self.dilation, f"{self.name}.dilation", (1, 2)))
        pool.ceil_mode = bool(self.ceil_mode)

    @classmethod
    def _from(cls, layer):
        p = layer.max_pool2d
        return cls(layer.name, _unwrap(p.kernel_size, 0), _unwrap(p.stride, None),
                   _unwrap(p.padding, 0), _unwrap(p.dilation, 1), p.ceil_mode,
                   layer.input or None)

    def parameters(self):
        return []

    def mixes_batch(self):
        return False


@dataclasses.dataclass
class AvgPool2d:
    """torch.nn.AvgPool2d (stride None: the kernel size)."""
    name: str
    kernel_size: typing.Any
    stride: typing.Any = None
    padding: typing.Any = 0
    ceil_mode: bool = False
    count_include_pad: bool = True
    input: typing.Optional[str] = None

    def _fill(self, layer):
        pool = layer.avg_pool2d
        pool.kernel_size.extend(_ints(self.kernel_size, f"{self.name}.kernel_size", (1, 2)))
        if self.stride is not None:
            pool.stride.extend(_ints(self.stride, f"{self.name}.stride", (1, 2)))
        pool.padding.extend(_ints(self.padding, f"{self.name}.padding", (1, 2)))
        pool.ceil_mode = bool(self.ceil_mode)
        pool.count_include_pad = bool(self.count_include_pad)

    @classmethod
    def _from(cls, layer):
        p = layer.avg_pool2d
        include = p.count_include_pad if p.HasField("count_include_pad") else True
        return cls(layer.name, _unwrap(p.kernel_size, 0), _unwrap(p.stride, None),
                   _unwrap(p.padding, 0), p.ceil_mode, include, layer.input or None)

    def parameters(self):
        return []

    def mixes_batch(self):
        return False


@dataclasses.dataclass
class BatchNorm2d:
    """torch.nn.BatchNorm2d with track_running_stats=True.

    training=True normalises with the batch's statistics and returns the updated running ones
    (result.running_stats); running_mean / running_var are then optional parameters (absent:
    zeros and ones). training=False (model.eval()) needs them. A network with a training batch
    norm cannot be sharded.
    """
    name: str
    num_features: int
    eps: float = 1e-5
    momentum: float = 0.1
    affine: bool = True
    training: bool = True
    input: typing.Optional[str] = None

    def _fill(self, layer):
        bn = layer.batch_norm2d
        bn.num_features = self.num_features
        bn.eps = float(self.eps)
        bn.momentum = float(self.momentum)
        bn.affine = bool(self.affine)
        bn.training = bool(self.training)

    @classmethod
    def _from(cls, layer):
        bn = layer.batch_norm2d
        if not bn.HasField("training"):
            raise ValueError(f"layer {layer.name!r}: batch_norm2d.training is not set; it has no "
                             "default (true: model.train(), false: model.eval())")
        return cls(layer.name, bn.num_features, bn.eps if bn.HasField("eps") else 1e-5,
                   bn.momentum if bn.HasField("momentum") else 0.1,
                   bn.affine if bn.HasField("affine") else True, bn.training,
                   layer.input or None)

    def parameters(self):
        shape = (self.num_features,)
        infos = []
        if self.affine:
            infos += [ParameterInfo(f"{self.name}.weight", shape),
                      ParameterInfo(f"{self.name}.bias", shape)]
        required = not self.training
        infos += [ParameterInfo(f"{self.name}.running_mean", shape, False, required),
                  ParameterInfo(f"{self.name}.running_var", shape, False, required)]
        return infos

    def mixes_batch(self):
        return bool(self.training)


@dataclasses.dataclass
class Linear:
    """torch.nn.Linear on the input flattened from dim 1: weight [out, in], bias [out]."""
    name: str
    in_features: int
    out_features: int
    bias: bool = True
    input: typing.Optional[str] = None

    def _fill(self, layer):
        layer.linear.in_features = self.in_features
        layer.linear.out_features = self.out_features
        layer.linear.bias = bool(self.bias)

    @classmethod
    def _from(cls, layer):
        f = layer.linear
        return cls(layer.name, f.in_features, f.out_features, f.bias, layer.input or None)

    def parameters(self):
        infos = [ParameterInfo(f"{self.name}.weight", (self.out_features, self.in_features))]
        if self.bias:
            infos.append(ParameterInfo(f"{self.name}.bias", (self.out_features,)))
        return infos

    def mixes_batch(self):
        return False


@dataclasses.dataclass
class Add:
    """A residual connection: the layer's input plus the output of layer `other` (an earlier
    layer's name, or "input")."""
    name: str
    other: str
    input: typing.Optional[str] = None

    def _fill(self, layer):
        layer.add.other = self.other

    @classmethod
    def _from(cls, layer):
        return cls(layer.name, layer.add.other, layer.input or None)

    def parameters(self):
        return []

    def mixes_batch(self):
        return False


LAYER_TYPES = (Conv2d, Activation, MaxPool2d, AvgPool2d, BatchNorm2d, Linear, Add)
# The proto's oneof field of each layer class; a kind added to one and not the other fails here.
_ONEOF_FIELD = {Conv2d: "conv2d", Activation: "activation", MaxPool2d: "max_pool2d",
                AvgPool2d: "avg_pool2d", BatchNorm2d: "batch_norm2d", Linear: "linear", Add: "add"}
_CLASS_OF_FIELD = {field: cls for cls, field in _ONEOF_FIELD.items()}
assert set(_CLASS_OF_FIELD) == {f.name for f in pb.Layer.DESCRIPTOR.oneofs_by_name["op"].fields}


class ParameterInfo(typing.NamedTuple):
    """One tensor a layer takes besides its input, named as in PyTorch's state_dict.

    trainable: a learnable parameter (it has a gradient) rather than a buffer (a running
    statistic). required: a request must carry it (an optional one is a training batch norm's
    running statistic, which starts from zeros / ones when absent).
    """
    name: str
    shape: tuple
    trainable: bool = True
    required: bool = True


class Network:
    """An ordered list of layers; see the module docstring."""

    def __init__(self, layers=()):
        self.layers = list(layers)
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, LAYER_TYPES):
                raise TypeError(f"layers[{i}]: expected a gradservice layer "
                                f"({', '.join(t.__name__ for t in LAYER_TYPES)}), got "
                                f"{type(layer).__name__}")
            _check_name(layer.name, f"layers[{i}].name")

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    def __eq__(self, other):
        return isinstance(other, Network) and self.layers == other.layers

    def __repr__(self):
        return f"Network({self.layers!r})"

    def to_proto(self):
        """The grad.v1.Network message."""
        message = pb.Network()
        for layer in self.layers:
            entry = message.layers.add()
            entry.name = layer.name
            if layer.input is not None:
                entry.input = layer.input
            layer._fill(entry)  # pylint: disable=protected-access
        return message

    @classmethod
    def from_proto(cls, message):
        """The Network of a grad.v1.Network message."""
        layers = []
        for i, layer in enumerate(message.layers):
            field = layer.WhichOneof("op")
            if field is None:
                raise ValueError(f"layers[{i}] ({layer.name!r}) has no op set")
            layers.append(_CLASS_OF_FIELD[field]._from(layer))  # pylint: disable=protected-access
        return cls(layers)

    def to_dict(self):
        """The protobuf JSON form (camelCase keys, as protobuf's JSON mapping writes them)."""
        return json_format.MessageToDict(self.to_proto())

    def to_json(self, indent=2):
        return json_format.MessageToJson(self.to_proto(), indent=indent)

    @classmethod
    def from_dict(cls, value):
        """From a dict in protobuf JSON form; unknown fields are an error, as for gradctl."""
        message = pb.Network()
        try:
            json_format.ParseDict(value, message, ignore_unknown_fields=False)
        except json_format.ParseError as error:
            raise ValueError(f"not a grad.v1.Network in protobuf JSON: {error}") from None
        return cls.from_proto(message)

    @classmethod
    def from_json(cls, text_or_path):
        """From protobuf JSON text, or the path (str or PathLike) of a file holding it."""
        if isinstance(text_or_path, os.PathLike) or (
                isinstance(text_or_path, str) and not text_or_path.lstrip().startswith("{")):
            path = os.fspath(text_or_path)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            source = path
        elif isinstance(text_or_path, str):
            text, source = text_or_path, "network JSON"
        else:
            raise TypeError("network: expected JSON text or a path, got "
                            f"{type(text_or_path).__name__}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source}: not JSON: {error}") from None
        try:
            return cls.from_dict(value)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None


def as_network(network, what="network"):
    """A Network from any accepted form: Network, a list of layers, grad.v1.Network, a dict in
    protobuf JSON form, or JSON text / a path of a JSON file."""
    if isinstance(network, Network):
        return network
    if isinstance(network, pb.Network):
        return Network.from_proto(network)
    if isinstance(network, dict):
        return Network.from_dict(network)
    if isinstance(network, (str, os.PathLike)):
        return Network.from_json(network)
    if isinstance(network, (list, tuple)):
        return Network(network)
    raise TypeError(f"{what}: expected a gradservice.Network, a grad.v1.Network, a dict or a "
                    f"JSON path, got {type(network).__name__}")


def parameter_infos(network):
    """Every parameter and buffer of `network`, layer by layer in PyTorch's order, as the server
    names them ("conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias", "bn1.running_mean",
    "bn1.running_var", ...)."""
    infos = []
    for layer in as_network(network).layers:
        infos.extend(layer.parameters())
    return infos


def check_rows_independent(network, shards):
    """Raises ValueError naming the first layer that mixes the batch's rows (a batch_norm2d
    with training=True) if shards > 1: such a batch cannot be cut into parts."""
    if shards <= 1:
        return
    for i, layer in enumerate(network.layers):
        if layer.mixes_batch():
            raise ValueError(
                f"shards={shards} cannot be used: layers[{i}] ({layer.name!r}, "
                f"{_ONEOF_FIELD[type(layer)]}) mixes the rows of the batch (a batch_norm2d in "
                "training mode normalises with the whole batch's statistics), so parts of the "
                "batch would not compute the whole batch's result; send it with shards=1")


def _pool_size(size, kernel, stride, pad, dilation, ceil_mode):
    """PyTorch's pooled size, as the engine computes it (engine/network.cc PoolOutputSize)."""
    span = dilation * (kernel - 1) + 1
    room = size + 2 * pad - span + (stride - 1 if ceil_mode else 0)
    if room < 0:
        return 0
    out = room // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _layer_output_shape(layer, shape):
    if isinstance(layer, (Activation, BatchNorm2d, Add)):
        return shape
    if isinstance(layer, Linear):
        return (shape[0], layer.out_features)
    if len(shape) != 4:
        raise ValueError(f"layer {layer.name!r} needs an NCHW input, got {list(shape)}")
    n, _, h, w = shape
    if isinstance(layer, Conv2d):
        kh, kw = _pair(_ints(layer.kernel_size, "kernel_size", (1, 2)))
        sh, sw = _pair(_ints(layer.stride, "stride", (1, 2)))
        dh, dw = _pair(_ints(layer.dilation, "dilation", (1, 2)))
        pad = _ints(layer.padding, "padding", (1, 2, 4))
        top, bottom, left, right = (pad * 4 if len(pad) == 1 else
                                    [pad[0], pad[0], pad[1], pad[1]] if len(pad) == 2 else pad)
        out_h = max(0, (h + top + bottom - dh * (kh - 1) - 1) // sh + 1)
        out_w = max(0, (w + left + right - dw * (kw - 1) - 1) // sw + 1)
        return (n, layer.out_channels, out_h, out_w)
    kh, kw = _pair(_ints(layer.kernel_size, "kernel_size", (1, 2)))
    sh, sw = _pair(_ints(layer.stride if layer.stride is not None else layer.kernel_size,
                         "stride", (1, 2)))
    ph, pw = _pair(_ints(layer.padding, "padding", (1, 2)))
    dh, dw = _pair(_ints(getattr(layer, "dilation", 1), "dilation", (1, 2)))
    return (n, shape[1], _pool_size(h, kh, sh, ph, dh, layer.ceil_mode),
            _pool_size(w, kw, sw, pw, dw, layer.ceil_mode))


def output_shape(network, input_shape):
    """The shape of `network`'s output for an input of `input_shape`, by the engine's shape
    rules; ValueError for a network these rules cannot follow (the server names the problem
    precisely: callers send such a network as it is)."""
    shapes = {NETWORK_INPUT: tuple(input_shape)}
    previous = tuple(input_shape)
    for layer in as_network(network).layers:
        source = previous if layer.input is None else shapes.get(layer.input)
        if source is None:
            raise ValueError(f"layer {layer.name!r} reads {layer.input!r}, not an earlier layer")
        previous = _layer_output_shape(layer, source)
        shapes[layer.name] = previous
    return previous
