"""The PyTorch reference cases of tests/fixtures/ as gradservice objects, and the project's
tolerance check (tests/tolerance.h) on numpy arrays.

A case directory's case.txt follows the grammar of tests/torch/fixture.h; parse_case reads it
strictly (an unknown directive or key, a missing or repeated key is a CaseError naming the
line), and load_case reads the .npy files beside it.
"""

import dataclasses
import pathlib
import typing

import numpy as np

import gradservice as gs


class CaseError(ValueError):
    pass


def _ints(text):
    return tuple(int(v) for v in text.split(","))


def _bool(text):
    if text not in ("0", "1"):
        raise ValueError(f"expected 0 or 1, got {text!r}")
    return text == "1"


# Per layer kind: its keys and how each becomes a layer argument.
_LAYER_KEYS = {
    "conv2d": {"in_channels": int, "out_channels": int, "kernel": _ints, "stride": _ints,
               "padding": _ints, "dilation": _ints, "groups": int, "bias": _bool},
    "relu": {}, "tanh": {}, "sigmoid": {}, "gelu": {}, "gelu_tanh": {},
    "leaky_relu": {"negative_slope": float},
    "elu": {"alpha": float},
    "max_pool2d": {"kernel": _ints, "stride": _ints, "padding": _ints, "dilation": _ints,
                   "ceil_mode": _bool},
    "avg_pool2d": {"kernel": _ints, "stride": _ints, "padding": _ints, "ceil_mode": _bool,
                   "count_include_pad": _bool},
    "batch_norm2d": {"num_features": int, "eps": float, "momentum": float, "affine": _bool,
                     "training": _bool, "running_stats": _bool},
    "linear": {"in_features": int, "out_features": int, "bias": _bool},
    "add": {"other": str},
}


def _make_layer(name, kind, v, source):
    """The gradservice layer of one `layer` line's values `v`; also whether its buffers are
    given (running_stats)."""
    if kind == "conv2d":
        return gs.Conv2d(name, v["in_channels"], v["out_channels"], v["kernel"], v["stride"],
                         v["padding"], v["dilation"], v["groups"], v["bias"]), True
    if kind in ("relu", "tanh", "sigmoid", "gelu", "gelu_tanh"):
        return gs.Activation(name, kind), True
    if kind == "leaky_relu":
        return gs.Activation(name, kind, v["negative_slope"]), True
    if kind == "elu":
        return gs.Activation(name, kind, v["alpha"]), True
    if kind == "max_pool2d":
        return gs.MaxPool2d(name, v["kernel"], v["stride"], v["padding"], v["dilation"],
                            v["ceil_mode"]), True
    if kind == "avg_pool2d":
        return gs.AvgPool2d(name, v["kernel"], v["stride"], v["padding"], v["ceil_mode"],
                            v["count_include_pad"]), True
    if kind == "batch_norm2d":
        if not v["running_stats"] and not v["training"]:
            raise CaseError(f"{source}: {name}: running_stats=0 needs training=1")
        return gs.BatchNorm2d(name, v["num_features"], v["eps"], v["momentum"], v["affine"],
                              v["training"]), v["running_stats"]
    if kind == "linear":
        return gs.Linear(name, v["in_features"], v["out_features"], v["bias"]), True
    if kind == "add":
        return gs.Add(name, v["other"]), True
    raise CaseError(f"{source}: layer kind {kind!r} is not in the grammar")


@dataclasses.dataclass
class CaseSpec:
    network: gs.Network
    objective: str = ""
    label_smoothing: float = 0.0
    ignore_index: int = -100
    input_grad: bool = True
    param_grads: typing.Any = "all"  # "all", "none" or a list of names
    omitted_buffers: set = dataclasses.field(default_factory=set)


def parse_case(text, source):
    layers = []
    omitted = set()
    seen = {}
    spec = CaseSpec(gs.Network())
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].split()
        if not line:
            continue
        where = f"{source}:{number}"
        directive = line[0]
        if directive != "layer":
            if directive in seen:
                raise CaseError(f"{where}: {directive} repeats line {seen[directive]}")
            seen[directive] = number
        if directive == "layer":
            if len(line) < 3:
                raise CaseError(f"{where}: expected 'layer NAME KIND key=value...'")
            name, kind = line[1], line[2]
            if kind not in _LAYER_KEYS:
                raise CaseError(f"{where}: unknown layer kind {kind!r}")
            keys = dict(_LAYER_KEYS[kind], input=str)
            values = {}
            for item in line[3:]:
                key, sep, value = item.partition("=")
                if not sep or key not in keys:
                    raise CaseError(f"{where}: unknown key {item!r} for {kind}")
                if key in values:
                    raise CaseError(f"{where}: key {key} repeats")
                try:
                    values[key] = keys[key](value)
                except ValueError as error:
                    raise CaseError(f"{where}: {key}={value}: {error}") from None
            missing = set(_LAYER_KEYS[kind]) - set(values)
            if missing:
                raise CaseError(f"{where}: missing {', '.join(sorted(missing))}")
            layer, buffers_given = _make_layer(name, kind, values, where)
            layer.input = values.get("input")
            layers.append(layer)
            if not buffers_given:
                omitted.update(p.name for p in layer.parameters() if not p.trainable)
        elif directive == "objective":
            if len(line) < 2 or line[1] not in ("mse", "sum", "grad_output", "cross_entropy"):
                raise CaseError(f"{where}: unknown objective {line[1:]}")
            spec.objective = line[1]
            if line[1] == "cross_entropy":
                values = dict(item.split("=", 1) for item in line[2:])
                if set(values) != {"label_smoothing", "ignore_index"}:
                    raise CaseError(f"{where}: cross_entropy needs exactly label_smoothing= "
                                    "and ignore_index=")
                spec.label_smoothing = float(values["label_smoothing"])
                spec.ignore_index = int(values["ignore_index"])
            elif len(line) != 2:
                raise CaseError(f"{where}: {line[1]} takes no keys")
        elif directive == "input_grad":
            if len(line) != 2:
                raise CaseError(f"{where}: expected input_grad 0|1")
            spec.input_grad = _bool(line[1])
        elif directive == "param_grads":
            if len(line) < 2:
                raise CaseError(f"{where}: expected param_grads all|none|NAME...")
            spec.param_grads = line[1] if line[1:] in (["all"], ["none"]) else line[1:]
        else:
            raise CaseError(f"{where}: unknown directive {directive!r}")
    for directive in ("objective", "input_grad", "param_grads"):
        if directive not in seen:
            raise CaseError(f"{source}: no {directive} line")
    spec.network = gs.Network(layers)
    spec.omitted_buffers = omitted
    trainable = {p.name for p in gs.parameter_infos(spec.network) if p.trainable}
    if isinstance(spec.param_grads, list):
        unknown = [n for n in spec.param_grads if n not in trainable]
        if unknown:
            raise CaseError(f"{source}: param_grads names {unknown}, not learnable parameters")
    return spec


@dataclasses.dataclass
class Case:
    name: str
    directory: pathlib.Path
    spec: CaseSpec
    input: np.ndarray
    params: dict
    objective: typing.Any
    expected_output: np.ndarray
    expected_loss: typing.Optional[float]
    expected_input_grad: typing.Optional[np.ndarray]
    expected_param_grads: dict
    expected_running_stats: dict


def _load(path, dtype):
    array = np.load(path, allow_pickle=False)
    if array.dtype != np.dtype(dtype):
        raise CaseError(f"{path} is {array.dtype}, expected {np.dtype(dtype)}")
    return array


def load_case(directory):
    directory = pathlib.Path(directory)
    spec = parse_case((directory / "case.txt").read_text(encoding="utf-8"),
                      str(directory / "case.txt"))
    params = {}
    for info in gs.parameter_infos(spec.network):
        if info.name not in spec.omitted_buffers:
            params[info.name] = _load(directory / "params" / f"{info.name}.npy", "<f4")
    present = {p.stem for p in (directory / "params").glob("*.npy")} \
        if (directory / "params").is_dir() else set()
    if present != set(params):
        raise CaseError(f"{directory}/params holds {sorted(present)}, expected {sorted(params)}")
    if spec.objective == "mse":
        objective = gs.Mse(_load(directory / "target.npy", "<f4"))
    elif spec.objective == "grad_output":
        objective = gs.GradOutput(_load(directory / "grad_output.npy", "<f4"))
    elif spec.objective == "sum":
        objective = gs.Sum()
    else:
        objective = gs.CrossEntropy(_load(directory / "labels.npy", "<i8"),
                                    spec.label_smoothing, spec.ignore_index)
    expected = directory / "expected"
    loss = None
    if spec.objective != "grad_output":
        loss = float(_load(expected / "loss.npy", "<f4").reshape(-1)[0])
    input_grad = _load(expected / "input.grad.npy", "<f4") if spec.input_grad else None
    trainable = [p for p in gs.parameter_infos(spec.network) if p.trainable]
    if spec.param_grads == "all":
        wanted = [p.name for p in trainable]
    elif spec.param_grads == "none":
        wanted = []
    else:
        wanted = list(spec.param_grads)
    param_grads = {n: _load(expected / f"{n}.grad.npy", "<f4") for n in wanted}
    updated = [p.name for layer in spec.network.layers
               if isinstance(layer, gs.BatchNorm2d) and layer.training
               for p in layer.parameters() if not p.trainable]
    running_stats = {n: _load(expected / f"{n}.npy", "<f4") for n in updated}
    return Case(directory.name, directory, spec, _load(directory / "input.npy", "<f4"), params,
                objective, _load(expected / "output.npy", "<f4"), loss, input_grad, param_grads,
                running_stats)


def find_cases(root):
    """The case directories (holding a case.txt) directly under `root`, sorted by name."""
    return sorted(p.parent for p in pathlib.Path(root).glob("*/case.txt"))


def assert_close(what, actual, expected, tolerance):
    """tests/tolerance.h's rule: same shape; non-finite values equal in kind (NaN where NaN);
    max |actual - expected| <= tolerance * max(1, max |finite expected|)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, \
        f"{what}: shape {actual.shape} != expected {expected.shape}"
    finite = np.isfinite(expected)
    both_nan = np.isnan(actual) & np.isnan(expected)
    odd = (~finite | ~np.isfinite(actual)) & ~both_nan & (actual != expected)
    if odd.any():
        index = int(np.flatnonzero(odd)[0])
        raise AssertionError(f"{what}: non-finite mismatch at flat index {index}: "
                             f"{actual.reshape(-1)[index]} vs {expected.reshape(-1)[index]}")
    scale = max(1.0, float(np.abs(expected[finite]).max())) if finite.any() else 1.0
    mask = finite & np.isfinite(actual)
    worst = float(np.abs(actual[mask] - expected[mask]).max()) if mask.any() else 0.0
    assert worst <= tolerance * scale, \
        f"{what}: max |actual - expected| = {worst} exceeds {tolerance * scale} = " \
        f"{tolerance} * {scale}"
