"""gradclient's optimizers against torch.optim, step by step.

optimizer_trace (tests/train/optimizer_trace.cc, its path in $OPTIMIZER_TRACE_BINARY) runs 50
steps of each C++ optimizer configuration on gradients from the service and records the
parameters before every step, the gradients, the final parameters and the torch.optim keyword
arguments of the configuration. This test starts torch.optim from the same parameters, feeds
it exactly those gradients, and after every step compares its parameters with the ones the C++
optimizer produced, within kOptimizerRelativeTolerance of tests/tolerance.h under the project's
rule: max |actual - expected| <= tolerance * max(1, max |expected|).
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 50
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
# Every configuration optimizer_trace must cover.
EXPECTED_CONFIGS = {
    "sgd_plain",
    "sgd_momentum_dampening_decay",
    "sgd_nesterov",
    "adam",
    "adam_amsgrad_decay",
    "adamw",
    "adamw_amsgrad",
}


def optimizer_tolerance():
    text = (REPO_ROOT / "tests" / "tolerance.h").read_text()
    match = re.search(r"kOptimizerRelativeTolerance\s*=\s*([0-9.eE+-]+)\s*;", text)
    assert match, "tests/tolerance.h defines no kOptimizerRelativeTolerance"
    return float(match.group(1))


def load_dir(path):
    return {p.name[: -len(".npy")]: np.load(p) for p in sorted(path.glob("*.npy"))}


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    binary = os.environ.get("OPTIMIZER_TRACE_BINARY")
    if not binary:
        pytest.fail("OPTIMIZER_TRACE_BINARY is not set (ctest sets it)")
    out = tmp_path_factory.mktemp("optimizer_trace")
    run = subprocess.run([binary, str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return out


def test_trace_covers_every_configuration(trace):
    names = set((trace / "configs.txt").read_text().split())
    assert names == EXPECTED_CONFIGS


@pytest.mark.parametrize("config_name", sorted(EXPECTED_CONFIGS))
def test_matches_torch_optim(trace, config_name):
    tolerance = optimizer_tolerance()
    config_dir = trace / config_name
    config = json.loads((config_dir / "config.json").read_text())
    start = load_dir(config_dir / "step_1" / "params")
    assert start, "no parameters recorded"
    params = {name: torch.tensor(value, requires_grad=True) for name, value in start.items()}
    names = sorted(params)
    optimizer = OPTIMIZERS[config["optimizer"]]([params[n] for n in names], **config["kwargs"])
    # The single-tensor path, as on CPU by default, and as the C++ side follows.
    for group in optimizer.param_groups:
        assert not group.get("foreach"), group

    worst = 0.0
    for step in range(1, STEPS + 1):
        step_dir = config_dir / f"step_{step}"
        grads = load_dir(step_dir / "grads")
        assert sorted(grads) == names
        for name in names:
            params[name].grad = torch.from_numpy(grads[name])
        optimizer.step()
        after = (config_dir / "final" if step == STEPS else
                 config_dir / f"step_{step + 1}" / "params")
        cpp = load_dir(after)
        assert sorted(cpp) == names
        for name in names:
            expected = params[name].detach().numpy()
            actual = cpp[name]
            assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
            assert np.all(np.isfinite(actual)), (step, name)
            scale = max(1.0, float(np.max(np.abs(expected))))
            diff = float(np.max(np.abs(actual.astype(np.float64) - expected)))
            worst = max(worst, diff / scale)
            assert diff <= tolerance * scale, (
                f"{config_name} step {step} {name}: max |c++ - torch| = {diff} > "
                f"{tolerance} * {scale}")
    # The parameters moved: a comparison of two unchanged starts would prove nothing.
    for name in names:
        assert not np.array_equal(start[name], params[name].detach().numpy()), name
    print(f"{config_name}: worst relative difference over {STEPS} steps {worst:.3g}")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-s"]))
