"""The layer classes of a Network (defined in gradservice.network), importable on their own:
from gradservice.layers import Conv2d, ReLU, ..."""

from .network import (ELU, GELU, LAYER_TYPES, Activation, Add, AvgPool2d, BatchNorm2d, Conv2d,
                      LeakyReLU, Linear, MaxPool2d, ReLU, Sigmoid, Tanh)

__all__ = ["Activation", "Add", "AvgPool2d", "BatchNorm2d", "Conv2d", "ELU", "GELU",
           "LAYER_TYPES", "LeakyReLU", "Linear", "MaxPool2d", "ReLU", "Sigmoid", "Tanh"]
