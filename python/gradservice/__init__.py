"""gradservice: the Python client of gradserver, the gradient computation service.

    import gradservice as gs
    net = gs.Network([gs.Conv2d("conv1", 1, 8, 3, padding=1), gs.ReLU("relu1")])
    with gs.Client("127.0.0.1:50051") as client:
        result = client.compute_gradients(net, params, x, gs.Mse(target))

Client and its results: gradservice.client; layers, Network and parameter_infos:
gradservice.network; objectives: gradservice.objectives; errors: GradServiceError.
gradservice.torch wraps a remote network as a torch.nn.Module (imports torch when imported).
"""

from . import layers
from .client import Client, ForwardResult, GradientResult, RetryOptions, TlsOptions
from .errors import GradServiceError
from .network import (ELU, GELU, Activation, Add, AvgPool2d, BatchNorm2d, Conv2d, LeakyReLU,
                      Linear, MaxPool2d, Network, ParameterInfo, ReLU, Sigmoid, Tanh,
                      parameter_infos)
from .objectives import CrossEntropy, GradOutput, Mse, Sum

__all__ = [
    "Activation", "Add", "AvgPool2d", "BatchNorm2d", "Client", "Conv2d", "CrossEntropy", "ELU",
    "ForwardResult", "GELU", "GradOutput", "GradServiceError", "GradientResult", "LeakyReLU",
    "Linear", "MaxPool2d", "Mse", "Network", "ParameterInfo", "ReLU", "RetryOptions", "Sigmoid",
    "Sum", "Tanh", "TlsOptions", "layers", "parameter_infos",
]
