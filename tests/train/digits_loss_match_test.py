#!/usr/bin/python3
"""`gradctl train` on the digits network takes PyTorch's steps: the same losses, the same weights.

For Adam and for SGD with momentum: the test initialises deploy/digits/digits_cnn.json in
PyTorch (torch.nn's initialisation, fixed seed), writes those weights as the --params of
`gradctl train`, and writes the exported digits training set in an order of its own (a fixed
permutation) as --inputs/--labels. gradctl then trains with --shuffle=false --max_steps=30
through a real gradserver, so its batches are the file's first 30 slices of 32, and PyTorch
(deploy/digits/torch_reference.py) replays the same 30 steps with torch.optim. Then
  - each step's loss in OUT/history.jsonl equals PyTorch's loss of that step,
  - every parameter in OUT/params/ equals PyTorch's after the 30th step,
within tests/tolerance.h's kRelativeTolerance and its rule (max |actual - expected| <=
tolerance * max(1, max |expected|)). The losses must have fallen and every parameter moved by
more than ten tolerances, so the comparison is of steps that change the weights.

    /usr/bin/python3 -m pytest tests/train/digits_loss_match_test.py

The binaries come from $GRADSERVER_BINARY and $GRADCTL_BINARY, else build/server/gradserver
and build/client/gradctl of this checkout.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy" / "digits"))

import export_digits  # noqa: E402  (found through the path above)
import torch_reference  # noqa: E402

NETWORK = ROOT / "deploy" / "digits" / "digits_cnn.json"
STEPS = 30
BATCH = 32
INIT_SEED = 7
ORDER_SEED = 11
# (name, gradctl flags, torch_reference.make_optimizer arguments); the learning rates are large
# enough that 30 steps change every weight well beyond the tolerance.
OPTIMIZERS = [
    ("adam", ["--optimizer=adam", "--lr=0.01"], {"optimizer": "adam", "lr": 0.01}),
    ("sgd_momentum", ["--optimizer=sgd", "--lr=0.1", "--momentum=0.9"],
     {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9}),
]
# The 30th step's loss is below this fraction of the first's (measured: about 0.44 with SGD,
# 0.09 with Adam).
LEARNED_LOSS_RATIO = 0.75
STARTUP_SECONDS = 60
# gradengine::EngineOptions::winograd_min_channels, the channels from which a 3x3 convolution
# uses Winograd kernels on a server with its default options, read from the engine's header.
WINOGRAD_MIN_CHANNELS = int(re.search(
    r"int64_t winograd_min_channels = (\d+);",
    (ROOT / "engine" / "include" / "gradengine" / "engine.h").read_text()).group(1))
LISTENING = re.compile(r"^gradserver listening on (\S+)$", re.MULTILINE)


def read_tolerance(name):
    """The value of `inline constexpr double <name> = ...;` in tests/tolerance.h."""
    text = (ROOT / "tests" / "tolerance.h").read_text(encoding="utf-8")
    match = re.search(rf"\b{name}\s*=\s*([0-9.eE+-]+)\s*;", text)
    if match is None:
        raise LookupError(f"tests/tolerance.h defines no {name}")
    return float(match.group(1))


TOLERANCE = read_tolerance("kRelativeTolerance")


def assert_close(what, actual, expected):
    """tests/tolerance.h's rule on finite arrays of the same shape."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.isfinite(actual).all(), f"{what}: non-finite values {actual}"
    scale = max(1.0, float(np.abs(expected).max()))
    difference = np.abs(actual - expected)
    worst = int(difference.argmax())
    assert difference.flat[worst] <= TOLERANCE * scale, (
        f"{what}: max |actual - expected| = {difference.flat[worst]} at flat index {worst} "
        f"(actual {actual.flat[worst]}, expected {expected.flat[worst]}) exceeds "
        f"{TOLERANCE * scale} = {TOLERANCE} * {scale}")


def binary(variable, default):
    path = pathlib.Path(os.environ.get(variable) or ROOT / default)
    if not os.access(path, os.X_OK):
        pytest.fail(f"{variable}: {path} is not an executable; build it or set {variable}")
    return path


def start_server(tmp_path_factory, *flags):
    """Runs a gradserver on a free loopback port with `flags`, yielding its target; it must exit
    0 after SIGTERM."""
    log_path = tmp_path_factory.mktemp("server") / "gradserver.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(binary("GRADSERVER_BINARY", "build/server/gradserver")),
             "--address=127.0.0.1:0", *flags], stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + STARTUP_SECONDS
    match = None
    while match is None:
        match = LISTENING.search(log_path.read_text())
        if match is None:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait()
                pytest.fail(f"gradserver did not start:\n{log_path.read_text()}")
            time.sleep(0.05)
    yield match.group(1)
    process.terminate()
    try:
        code = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    assert code == 0, f"gradserver exited with {code}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A gradserver with its default options."""
    yield from start_server(tmp_path_factory)


@pytest.fixture(scope="module")
def direct_server(tmp_path_factory):
    """A gradserver computing every convolution directly (--winograd=false)."""
    yield from start_server(tmp_path_factory, "--winograd=false")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The training set in the test's own fixed order, as gradctl reads it and as arrays."""
    inputs, labels, _, _ = export_digits.load_split()
    assert len(inputs) >= STEPS * BATCH
    order = np.random.default_rng(ORDER_SEED).permutation(len(inputs))
    inputs = np.ascontiguousarray(inputs[order])
    labels = np.ascontiguousarray(labels[order])
    directory = tmp_path_factory.mktemp("data")
    np.save(directory / "inputs.npy", inputs)
    np.save(directory / "labels.npy", labels)
    return directory, inputs, labels


def read_step_losses(history):
    losses = {}
    for line in history.read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "step":
            assert record["step"] not in losses, f"{history}: step {record['step']} twice"
            losses[record["step"]] = record["loss"]
    return [losses[step] for step in sorted(losses)]


def check_first_steps(server, data, tmp_path, network_path, name, flags, torch_optimizer):
    directory, inputs, labels = data
    network = torch_reference.load_network(network_path)
    model = torch_reference.build_model(network, seed=INIT_SEED)
    torch_reference.write_params(model, tmp_path / "initial")
    initial = torch_reference.params_numpy(model)

    out = tmp_path / "out"
    command = [str(binary("GRADCTL_BINARY", "build/client/gradctl")), "train",
               f"--server={server}", f"--net={network_path}", f"--params={tmp_path / 'initial'}",
               f"--inputs={directory / 'inputs.npy'}", f"--labels={directory / 'labels.npy'}",
               "--epochs=1", f"--batch={BATCH}", "--shuffle=false", f"--max_steps={STEPS}",
               f"--out={out}", *flags]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{' '.join(command)} exited {run.returncode}:\n{run.stderr}"

    optimizer = torch_reference.make_optimizer(model, **torch_optimizer)
    expected_losses = torch_reference.train_steps(model, optimizer, torch.from_numpy(inputs),
                                                  torch.from_numpy(labels), batch=BATCH,
                                                  max_steps=STEPS)
    losses = read_step_losses(out / "history.jsonl")
    assert len(losses) == len(expected_losses) == STEPS
    for step, (loss, expected) in enumerate(zip(losses, expected_losses), start=1):
        assert_close(f"{name}: loss of step {step}", loss, expected)
    assert expected_losses[-1] < LEARNED_LOSS_RATIO * expected_losses[0], expected_losses

    expected_params = torch_reference.params_numpy(model)
    written = sorted(path.stem for path in (out / "params").glob("*.npy"))
    assert written == sorted(expected_params), f"{out / 'params'} holds {written}"
    for parameter, expected in expected_params.items():
        trained = np.load(out / "params" / f"{parameter}.npy")
        assert trained.dtype == np.float32, f"{parameter}: {trained.dtype}"
        # The steps moved this parameter: a trainer that wrote back its input would fail here.
        assert np.abs(expected - initial[parameter]).max() > 10 * TOLERANCE, parameter
        assert_close(f"{name}: {parameter} after {STEPS} steps", trained, expected)


@pytest.mark.parametrize("name,flags,torch_optimizer", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_first_steps_match_pytorch(server, data, tmp_path, name, flags, torch_optimizer):
    check_first_steps(server, data, tmp_path, NETWORK, name, flags, torch_optimizer)


def test_wide_network_matches_pytorch_with_direct_convolutions(direct_server, data, tmp_path):
    """With 32 and more channels on both sides of conv2, the engine would use Winograd kernels,
    whose rounding turns weight gradients that are exactly zero in PyTorch into about 1e-9, and
    Adam makes those real steps; on a server started with --winograd=false Adam follows
    PyTorch's steps on such a network too."""
    network = json.loads(NETWORK.read_text())
    conv1, conv2 = (layer["conv2d"] for layer in network["layers"] if "conv2d" in layer)
    assert conv2["outChannels"] >= WINOGRAD_MIN_CHANNELS
    conv1["outChannels"] = conv2["inChannels"] = WINOGRAD_MIN_CHANNELS
    wide = tmp_path / "wide_cnn.json"
    wide.write_text(json.dumps(network))
    name, flags, torch_optimizer = OPTIMIZERS[0]
    check_first_steps(direct_server, data, tmp_path, wide, f"{name} (wide)", flags,
                      torch_optimizer)
