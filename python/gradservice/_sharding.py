"""Data-parallel sharding of one call, combined exactly as the C++ client does
(client/sharding.h): cut the batch (dim 0) into contiguous parts, compute each on its own, and
join the parts' results into the whole batch's.

Outputs and input gradients are concatenated; parameter gradients and the loss are sums over
the parts weighted by each part's share of the objective's mean:

    w_k = n_k / N (mse), c_k / C (cross_entropy: labels not ignore_index), 1 (sum, grad_output)

A cross-entropy part whose labels are all ignored has weight 0 (its rows' input gradient is 0);
if every label is ignored the parts are added with weight 1, so the loss is NaN as the whole
batch's is. Parameter gradients are summed in float64, so the order of the parts adds no
rounding of its own. The result equals the unsharded one up to float rounding.
"""

import numpy as np

from .objectives import CrossEntropy, GradOutput, Mse


def split_batch(batch, shards):
    """min(shards, batch) (begin, end) row ranges covering [0, batch), as equal as possible
    (the first batch % count have one row more)."""
    count = min(batch, shards)
    base, larger = divmod(batch, count)
    slices = []
    begin = 0
    for i in range(count):
        rows = base + (1 if i < larger else 0)
        slices.append((begin, begin + rows))
        begin += rows
    return slices


def _has_rows(array, batch):
    return array is not None and array.ndim >= 1 and array.shape[0] == batch


def shardable_batch(input_array, objective_array, objective):
    """The batch size if the request can be cut along dim 0 (a 4-dim input and an objective
    tensor with the same number of rows), else 0: such a request is sent whole, for the server
    to name what is wrong."""
    if input_array.ndim != 4 or input_array.shape[0] < 1:
        return 0
    batch = input_array.shape[0]
    if isinstance(objective, (Mse, GradOutput, CrossEntropy)):
        return batch if _has_rows(objective_array, batch) else 0
    return batch


def part_weights(objective, labels, slices):
    """w_k of each part (see the module docstring)."""
    if isinstance(objective, Mse):
        batch = slices[-1][1]
        return [(end - begin) / batch for begin, end in slices]
    if isinstance(objective, CrossEntropy):
        counts = [int(np.count_nonzero(labels[begin:end] != objective.ignore_index))
                  for begin, end in slices]
        total = sum(counts)
        return [1.0 if total == 0 else count / total for count in counts]
    return [1.0] * len(slices)


def _concat(parts, weights):
    """The parts one after the other along dim 0, part i scaled by weights[i] in float32 (a
    part of weight 0 contributes zeros, whatever NaN its 0/0 held). None if any part is."""
    if any(p is None for p in parts):
        return None
    scaled = []
    for part, weight in zip(parts, weights):
        if weight == 1.0:
            scaled.append(part)
        elif weight == 0.0:
            scaled.append(np.zeros_like(part))
        else:
            scaled.append(part * np.float32(weight))
    return np.concatenate(scaled, axis=0)


def combine_forward(parts):
    """The whole batch's ForwardResult fields from the parts' (decoded dicts)."""
    return {"output": _concat([p["output"] for p in parts], [1.0] * len(parts)),
            "running_stats": dict(parts[0]["running_stats"])}


def combine_gradients(objective, labels, slices, parts):
    """The whole batch's ComputeGradients fields from the parts' (decoded dicts)."""
    weights = part_weights(objective, labels, slices)
    whole = {
        "output": _concat([p["output"] for p in parts], [1.0] * len(parts)),
        "input_grad": _concat([p["input_grad"] for p in parts], weights),
        "running_stats": dict(parts[0]["running_stats"]),
        "loss": None,
        "param_grads": {},
    }
    if parts[0]["loss"] is not None:
        whole["loss"] = float(sum(w * (p["loss"] or 0.0)
                                  for w, p in zip(weights, parts) if w != 0.0))
    for name, first in parts[0]["param_grads"].items():
        total = np.zeros(first.shape, np.float64)
        for weight, part in zip(weights, parts):
            grad = part["param_grads"].get(name)
            if weight != 0.0 and grad is not None:
                total += weight * grad.astype(np.float64)
        whole["param_grads"][name] = total.astype(np.float32)
    return whole
