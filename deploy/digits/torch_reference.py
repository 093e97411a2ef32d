"""The PyTorch twin of a network file and of `gradctl train`'s loop, for the digits checks.

A network file (the protobuf JSON of grad.v1.Network that `gradctl --net` reads, such as
digits_cnn.json) becomes a torch.nn.Module whose state_dict names its tensors exactly as the
server does ("conv1.weight", "conv1.bias", "fc.weight", ...), so parameters move between the two
as DIR/<name>.npy files. The optimizer flags of `gradctl train` map to torch.optim here, and
`batch_indices` gives the batch order of `--shuffle=false` (the file's order, the last partial
batch kept), so a run of either can be replayed in the other step for step.

Sequential networks of conv2d, activation, max_pool2d, avg_pool2d and linear layers are
supported (the kinds the digits network uses, and their neighbours without state); anything
else is a ValueError naming the layer.

    import torch_reference as ref
    model = ref.build_model(ref.load_network("deploy/digits/digits_cnn.json"), seed=0)
    ref.write_params(model, "params")          # what `gradctl train --params=params` reads
    optimizer = ref.make_optimizer(model, "adam", lr=1e-3)
    losses = ref.train_steps(model, optimizer, inputs, labels, batch=32, max_steps=30)
"""

import json
import pathlib

import numpy as np
import torch
import torch.nn.functional as F

_ACTIVATIONS = {
    "RELU": lambda x, alpha: F.relu(x),
    "LEAKY_RELU": lambda x, alpha: F.leaky_relu(x, alpha),
    "TANH": lambda x, alpha: torch.tanh(x),
    "SIGMOID": lambda x, alpha: torch.sigmoid(x),
    "ELU": lambda x, alpha: F.elu(x, alpha),
    "GELU": lambda x, alpha: F.gelu(x),
    "GELU_TANH": lambda x, alpha: F.gelu(x, approximate="tanh"),
}
# The enum's numbers (proto/grad/v1/gradient_service.proto), which protobuf JSON also accepts.
_ACTIVATION_NUMBERS = {1: "RELU", 2: "LEAKY_RELU", 3: "TANH", 4: "SIGMOID", 5: "ELU", 6: "GELU",
                       7: "GELU_TANH"}
# The kinds of grad.v1.Layer's oneof: a layer names exactly one of them.
_LAYER_KINDS = ("conv2d", "activation", "max_pool2d", "avg_pool2d", "batch_norm2d", "linear",
                "add")


def _snake(name):
    """protobuf JSON accepts both lowerCamelCase and the proto's own snake_case field names."""
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


def _normalize(value):
    if isinstance(value, dict):
        return {_snake(k): _normalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    return value


def load_network(network):
    """Reads a network: a path to a protobuf-JSON file, its text, or the parsed dict.

    Returns the dict with snake_case keys, as `build_model` takes it.
    """
    if isinstance(network, dict):
        return _normalize(network)
    text = str(network)
    if not text.lstrip().startswith("{"):
        text = pathlib.Path(network).read_text()
    return _normalize(json.loads(text))


def _pair(layer_name, field, values, default):
    """An int-or-pair proto field ([k] or [kh, kw]) as torch's (h, w) tuple."""
    if values is None or len(values) == 0:
        values = default
    values = [int(v) for v in values]  # protobuf JSON may spell int64 as a string
    if len(values) == 1:
        return (values[0], values[0])
    if len(values) == 2:
        return tuple(values)
    raise ValueError(f"layers[{layer_name}].{field}={values}: expected [k] or [kh, kw]")


class TorchNetwork(torch.nn.Module):
    """A grad.v1.Network in PyTorch, with the server's parameter names.

    forward(x) returns the last layer's output ([N, 10] logits for the digits network).
    """

    def __init__(self, network):
        super().__init__()
        network = load_network(network)
        self._steps = []  # (name, kind, options) in order
        for index, layer in enumerate(network.get("layers", [])):
            name = layer.get("name", "")
            where = f"layers[{index}] ({name!r})"
            if layer.get("input", ""):
                raise ValueError(f"{where}.input={layer['input']!r}: only sequential networks "
                                 "are supported here")
            kinds = [k for k in _LAYER_KINDS if k in layer]
            if len(kinds) != 1:
                raise ValueError(f"{where}: expected exactly one layer kind, got {kinds}")
            kind = kinds[0]
            options = layer[kind]
            if kind == "conv2d":
                module = torch.nn.Conv2d(
                    int(options["in_channels"]), int(options["out_channels"]),
                    _pair(where, "conv2d.kernel_size", options.get("kernel_size"), None),
                    stride=_pair(where, "conv2d.stride", options.get("stride"), [1]),
                    padding=self._conv_padding(where, options.get("padding")),
                    dilation=_pair(where, "conv2d.dilation", options.get("dilation"), [1]),
                    groups=int(options.get("groups", 0)) or 1,
                    bias=bool(options.get("bias", False)))
                self.add_module(name, module)
            elif kind == "linear":
                module = torch.nn.Linear(int(options["in_features"]),
                                         int(options["out_features"]),
                                         bias=bool(options.get("bias", False)))
                self.add_module(name, module)
            elif kind == "activation":
                activation = options.get("kind", "ACTIVATION_KIND_UNSPECIFIED")
                activation = _ACTIVATION_NUMBERS.get(activation, activation)
                if activation not in _ACTIVATIONS:
                    raise ValueError(f"{where}.activation.kind={activation!r} is not one of "
                                     f"{sorted(_ACTIVATIONS)}")
                options = {"kind": activation, "alpha": float(options.get("alpha", 0.0))}
            elif kind in ("max_pool2d", "avg_pool2d"):
                kernel = _pair(where, f"{kind}.kernel_size", options.get("kernel_size"), None)
                options = {
                    "kernel_size": kernel,
                    "stride": _pair(where, f"{kind}.stride", options.get("stride"), kernel),
                    "padding": _pair(where, f"{kind}.padding", options.get("padding"), [0]),
                    "dilation": _pair(where, f"{kind}.dilation", options.get("dilation"), [1]),
                    "ceil_mode": bool(options.get("ceil_mode", False)),
                    "count_include_pad": bool(options.get("count_include_pad", True)),
                }
            else:
                raise ValueError(f"{where}: layer kind {kind!r} is not supported here")
            self._steps.append((name, kind, options))

    @staticmethod
    def _conv_padding(where, values):
        if values is not None and len(values) == 4:
            raise ValueError(f"{where}.conv2d.padding={values}: asymmetric padding is not "
                             "supported here")
        return _pair(where, "conv2d.padding", values, [0])

    def forward(self, x):
        for name, kind, options in self._steps:
            if kind in ("conv2d", "linear"):
                if kind == "linear":
                    x = torch.flatten(x, 1)
                x = getattr(self, name)(x)
            elif kind == "activation":
                x = _ACTIVATIONS[options["kind"]](x, options["alpha"])
            elif kind == "max_pool2d":
                x = F.max_pool2d(x, options["kernel_size"], options["stride"], options["padding"],
                                 options["dilation"], options["ceil_mode"])
            else:
                x = F.avg_pool2d(x, options["kernel_size"], options["stride"], options["padding"],
                                 options["ceil_mode"], options["count_include_pad"])
        return x


def build_model(network, seed=None):
    """A TorchNetwork with torch.nn's default initialisation, drawn from `seed` if given."""
    if seed is None:
        return TorchNetwork(network)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TorchNetwork(network)


def params_numpy(model):
    """The model's parameters as {server name: C-contiguous float32 array}."""
    return {name: np.ascontiguousarray(tensor.detach().cpu().numpy().astype(np.float32))
            for name, tensor in model.state_dict().items()}


def write_params(model, directory):
    """Writes DIR/<name>.npy for every parameter (what `gradctl --params=DIR` reads)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in params_numpy(model).items():
        np.save(directory / f"{name}.npy", array)


def read_params(model, directory):
    """Loads DIR/<name>.npy into the model; every parameter of the model must be there."""
    directory = pathlib.Path(directory)
    state = {}
    for name in model.state_dict():
        path = directory / f"{name}.npy"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no file for parameter {name!r}")
        state[name] = torch.from_numpy(np.load(path))
    model.load_state_dict(state)


def make_optimizer(model, optimizer, lr, *, momentum=0.0, dampening=0.0, nesterov=False,
                   weight_decay=None, beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=False):
    """The torch.optim optimizer `gradctl train --optimizer=... --lr=...` and its flags mean.

    weight_decay=None is torch.optim's default: 0 for sgd and adam, 0.01 for adamw.
    """
    parameters = model.parameters()
    if optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, dampening=dampening,
                               nesterov=nesterov, weight_decay=weight_decay or 0.0)
    if optimizer == "adam":
        return torch.optim.Adam(parameters, lr=lr, betas=(beta1, beta2), eps=eps,
                                weight_decay=weight_decay or 0.0, amsgrad=amsgrad)
    if optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, betas=(beta1, beta2), eps=eps,
                                 weight_decay=0.01 if weight_decay is None else weight_decay,
                                 amsgrad=amsgrad)
    raise ValueError(f"optimizer={optimizer!r}: expected sgd, adam or adamw")


def batch_indices(num_samples, batch, order=None):
    """The batches of one epoch: consecutive slices of `order` (default the file's order) of
    `batch` samples each, the last partial one kept."""
    if batch <= 0:
        raise ValueError(f"batch={batch}: must be positive")
    order = np.arange(num_samples) if order is None else np.asarray(order)
    return [order[start:start + batch] for start in range(0, num_samples, batch)]


def train_steps(model, optimizer, inputs, labels, *, batch, epochs=1, max_steps=None,
                orders=None):
    """Runs optimizer steps of cross-entropy (mean over the batch) and returns their losses.

    Epoch e visits the samples in orders(e) if given, else in the file's order; training stops
    after `epochs` epochs or `max_steps` steps, whichever comes first.
    """
    inputs = torch.as_tensor(inputs)
    labels = torch.as_tensor(labels)
    losses = []
    model.train()
    for epoch in range(epochs):
        order = None if orders is None else orders(epoch)
        for index in batch_indices(len(inputs), batch, order):
            if max_steps is not None and len(losses) >= max_steps:
                return losses
            index = torch.as_tensor(index)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(inputs[index]), labels[index])
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
    return losses


@torch.no_grad()
def evaluate(model, inputs, labels):
    """(mean cross-entropy, accuracy) of the model on a whole set."""
    model.eval()
    logits = model(torch.as_tensor(inputs))
    labels = torch.as_tensor(labels)
    loss = float(F.cross_entropy(logits, labels))
    accuracy = float((logits.argmax(dim=1) == labels).double().mean())
    return loss, accuracy

