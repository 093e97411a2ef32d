"""What Client.compute_gradients differentiates: one of four objectives (grad.v1.Objective).

    Mse(target)        loss = mean((output - target) ** 2); target shaped like the output
    Sum()              loss = sum(output)
    GradOutput(g)      dL/d(output) = g given by the caller (a vector-Jacobian product); no loss
    CrossEntropy(labels, label_smoothing=0.0, ignore_index=-100)
                       F.cross_entropy(output, labels, ...), mean over the labels not ignored;
                       labels are int64 class indices, [N] for [N, C] logits or [N, H, W] for
                       [N, C, H, W], always sent as bytes (never through shared memory)

Arrays are checked when the call is made (gradservice._arrays): float64 / float16 targets are
converted to float32.
"""

import dataclasses
import typing


@dataclasses.dataclass
class Mse:
    target: typing.Any


@dataclasses.dataclass
class Sum:
    pass


@dataclasses.dataclass
class GradOutput:
    grad: typing.Any


@dataclasses.dataclass
class CrossEntropy:
    labels: typing.Any
    label_smoothing: float = 0.0
    ignore_index: int = -100


OBJECTIVE_TYPES = (Mse, Sum, GradOutput, CrossEntropy)
