"""The digits demo through gradservice.torch: a RemoteNetwork of deploy/digits/digits_cnn.json
trains step for step like PyTorch's all-local model of the same file.

Both start from the same weights (torch.nn's initialisation under the same seed), see the same
batches (the exported training set in its file order, the demo's batch size, no shuffle) and
take the same steps of the demo's optimizer (deploy/train-digits.sh); the loss of each of the
first 30 steps must agree within the project's tolerance (tests/tolerance.h).
"""

import importlib.util
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from fixture_case import assert_close
from gradservice.torch import RemoteNetwork

NETWORK = "deploy/digits/digits_cnn.json"
STEPS = 30
SEED = 0


@pytest.fixture(scope="module")
def recipe(repo_root):
    """(optimizer, lr, weight_decay, batch) of the digits demo: the `readonly NAME=VALUE` lines
    of deploy/train-digits.sh (weight_decay None, the optimizer's default, if it sets none)."""
    text = (repo_root / "deploy" / "train-digits.sh").read_text(encoding="utf-8")
    values = dict(re.findall(r"^readonly (\w+)=(\S+)$", text, flags=re.MULTILINE))
    weight_decay = float(values["WEIGHT_DECAY"]) if "WEIGHT_DECAY" in values else None
    return values["OPTIMIZER"], float(values["LR"]), weight_decay, int(values["BATCH"])


@pytest.fixture(scope="module")
def reference(repo_root):
    """deploy/digits/torch_reference.py: the network file as a torch.nn.Module, and the loop."""
    path = repo_root / "deploy" / "digits" / "torch_reference.py"
    spec = importlib.util.spec_from_file_location("torch_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def digits(repo_root, tmp_path_factory):
    """(train_inputs, train_labels) as deploy/digits/export_digits.py writes them."""
    out = tmp_path_factory.mktemp("digits")
    subprocess.run([sys.executable, str(repo_root / "deploy" / "digits" / "export_digits.py"),
                    "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    return np.load(out / "train_inputs.npy"), np.load(out / "train_labels.npy")


def remote_network(repo_root, client):
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        return RemoteNetwork(repo_root / NETWORK, client)


def train_with_loss_call(remote, optimizer, inputs, labels, batch, reference):
    """The reference's loop, with the network's one-call loss() in place of forward + F.loss."""
    inputs = torch.as_tensor(inputs)
    labels = torch.as_tensor(labels)
    losses = []
    for index in reference.batch_indices(len(inputs), batch)[:STEPS]:
        index = torch.as_tensor(index)
        optimizer.zero_grad()
        loss = remote.loss(inputs[index], labels[index], objective="cross_entropy")
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("path", ["forward", "loss"])
def test_first_steps_match_local_pytorch(client, repo_root, reference, digits, recipe, tolerance,
                                         path):
    optimizer_name, lr, weight_decay, batch = recipe
    inputs, labels = digits
    assert len(inputs) >= STEPS * batch
    local = reference.build_model(reference.load_network(repo_root / NETWORK), seed=SEED)
    remote = remote_network(repo_root, client)
    local_state = local.state_dict()
    assert list(remote.state_dict()) == list(local_state)
    for name, tensor in remote.state_dict().items():
        assert torch.equal(tensor, local_state[name]), f"initial {name}"

    local_losses = reference.train_steps(
        local, reference.make_optimizer(local, optimizer_name, lr=lr, weight_decay=weight_decay),
        inputs, labels, batch=batch, max_steps=STEPS)
    optimizer = reference.make_optimizer(remote, optimizer_name, lr=lr,
                                         weight_decay=weight_decay)
    if path == "forward":
        # The same loop trains both: the remote network is an ordinary torch.nn.Module.
        remote_losses = reference.train_steps(remote, optimizer, inputs, labels, batch=batch,
                                              max_steps=STEPS)
    else:
        remote_losses = train_with_loss_call(remote, optimizer, inputs, labels, batch, reference)

    assert len(remote_losses) == len(local_losses) == STEPS
    for step, (remote_loss, local_loss) in enumerate(zip(remote_losses, local_losses)):
        assert_close(f"loss of step {step + 1}", remote_loss, local_loss, tolerance)
    # The steps learn: the comparison is of a run that goes somewhere.
    assert sum(local_losses[-5:]) < 0.97 * sum(local_losses[:5]), local_losses
