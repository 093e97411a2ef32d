"""PyTorch modules whose computation runs on a gradserver.

With a server listening on localhost:50051, from the repository root:

    import gradservice, gradservice.torch as gt, torch
    net = gt.RemoteNetwork("deploy/digits/digits_cnn.json", gradservice.Client("localhost:50051"))
    net.loss(torch.rand(32, 1, 8, 8), torch.randint(10, (32,))).backward()  # net.fc.weight.grad

`RemoteNetwork` is a torch.nn.Module that owns the network's parameters (named and initialised
as torch.nn's modules would be) and computes on the server: `net(x)` can sit anywhere in a
larger autograd graph, and `loss.backward()` fills `x.grad` and each parameter's `.grad`, so
any torch.optim optimizer trains it. `net.loss(x, target)` is the one-call path for when the
loss is the network's last step.

Importing this module imports torch; `import gradservice` alone does not.
"""

import copy

import numpy as np
import torch

from . import Client, CrossEntropy, GradOutput, Mse, parameter_infos
from .network import as_network

__all__ = ["RemoteNetwork"]

# torch.nn modules whose initialisation a layer kind takes its parameters from.
_PARAMETRISED_KINDS = ("conv2d", "linear", "batch_norm2d")
_OBJECTIVES = ("cross_entropy", "mse")


def _check_cpu(tensor, what):
    if tensor.device.type != "cpu":
        raise ValueError(f"{what} is on {tensor.device}: RemoteNetwork sends only CPU tensors "
                         "(move it with .cpu())")


def _to_wire(tensor, what):
    """The tensor as the C-contiguous float32 array the wire carries: the tensor's own memory
    when it already is float32 and contiguous, a converted copy otherwise."""
    _check_cpu(tensor, what)
    if not tensor.is_floating_point():
        raise TypeError(f"{what}: expected a floating-point tensor, got {tensor.dtype}")
    return tensor.detach().to(torch.float32).contiguous().numpy()


def _from_wire(array, dtype):
    """A float32 array of a response as a tensor of `dtype`."""
    array = np.asarray(array)
    # Arrays that view a response's bytes are read-only; torch tensors are always writable.
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array).to(dtype)


def _torch_pair(values, default):
    """A repeated int-or-pair proto field ([k] or [kh, kw]) as torch.nn's (h, w) tuple."""
    values = [int(v) for v in values] or default
    return (values[0], values[0]) if len(values) == 1 else tuple(values)


class RemoteLayer(torch.nn.Module):
    """The parameters and buffers of one layer of a RemoteNetwork, as torch.nn names them
    (`weight`, `bias`, and for batch_norm2d `running_mean`, `running_var`,
    `num_batches_tracked`). It computes nothing itself: its RemoteNetwork sends it."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def extra_repr(self):
        return self.kind


def _torch_module(layer):
    """The torch.nn module a parametrised layer (a grad.v1.Layer message) corresponds to, with
    its hyperparameters, freshly initialised by torch.nn."""
    kind = layer.WhichOneof("op")
    if kind == "conv2d":
        spec = layer.conv2d
        padding = [int(p) for p in spec.padding]
        # torch.nn.Conv2d has no asymmetric padding; its initialisation does not depend on
        # padding, so a [top, bottom, left, right] padding is left out of the twin.
        padding = _torch_pair(padding, [0]) if len(padding) <= 2 else 0
        return torch.nn.Conv2d(int(spec.in_channels), int(spec.out_channels),
                               _torch_pair(spec.kernel_size, []),
                               stride=_torch_pair(spec.stride, [1]), padding=padding,
                               dilation=_torch_pair(spec.dilation, [1]),
                               groups=int(spec.groups) or 1, bias=spec.bias)
    if kind == "linear":
        spec = layer.linear
        return torch.nn.Linear(int(spec.in_features), int(spec.out_features), bias=spec.bias)
    spec = layer.batch_norm2d
    return torch.nn.BatchNorm2d(int(spec.num_features),
                                eps=spec.eps if spec.HasField("eps") else 1e-5,
                                momentum=spec.momentum if spec.HasField("momentum") else 0.1,
                                affine=spec.affine if spec.HasField("affine") else True)


class _RemoteForward(torch.autograd.Function):
    """y = network(x; parameters), computed by the server: Forward now, and ComputeGradients
    with dL/dy as the objective when autograd asks for the vector-Jacobian product."""

    @staticmethod
    def forward(ctx, remote, x, *params):
        network = remote._wire_network()
        buffers = remote._wire_buffers()
        wire_input = _to_wire(x, "input")
        result = remote.client.forward(network, remote._wire_params(params, buffers), wire_input)
        # The running statistics move once per training forward; the backward's recompute
        # sends the statistics this call saw and ignores the ones it returns.
        remote._store_running_stats(result.running_stats)
        ctx.remote = remote
        ctx.network = network
        ctx.buffers = buffers
        ctx.save_for_backward(x, *params)
        return _from_wire(result.output, x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        x, *params = ctx.saved_tensors
        remote = ctx.remote
        wants_input, wanted = remote._wanted_gradients(ctx.needs_input_grad[1:])
        result = remote.client.compute_gradients(
            ctx.network, remote._wire_params(params, ctx.buffers), _to_wire(x, "input"),
            GradOutput(_to_wire(grad_output, "grad_output")), input_grad=wants_input,
            param_grads=wanted, skip_output=True)
        grad_input = _from_wire(result.input_grad, x.dtype) if wants_input else None
        return (None, grad_input, *remote._param_grads(result.param_grads, params,
                                                       ctx.needs_input_grad[2:]))


class _RemoteLoss(torch.autograd.Function):
    """loss = objective(network(x; parameters)) and its gradients in one ComputeGradients call;
    backward scales the gradients the call returned by dL_total/d(loss)."""

    @staticmethod
    def forward(ctx, remote, objective, grad_enabled, x, *params):
        needs = ctx.needs_input_grad[3:] if grad_enabled else (False,) * (1 + len(params))
        wants_input, wanted = remote._wanted_gradients(needs)
        network = remote._wire_network()
        buffers = remote._wire_buffers()
        result = remote.client.compute_gradients(
            network, remote._wire_params(params, buffers), _to_wire(x, "input"), objective,
            input_grad=wants_input, param_grads=wanted, skip_output=True)
        remote._store_running_stats(result.running_stats)
        ctx.grad_input = _from_wire(result.input_grad, x.dtype) if wants_input else None
        ctx.grad_params = remote._param_grads(result.param_grads, params, needs[1:])
        return torch.tensor(result.loss, dtype=x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        def scaled(grad):
            return None if grad is None else grad * grad_loss.to(grad.dtype)

        return (None, None, None, scaled(ctx.grad_input),
                *(scaled(grad) for grad in ctx.grad_params))


class RemoteNetwork(torch.nn.Module):
    """A network whose forward and backward passes run on a gradserver.

    RemoteNetwork(network, client, *, state_dict=None)

    `network` is anything gradservice.Client accepts (a gradservice.Network, a grad.v1.Network
    message, its protobuf-JSON dict, or the path of such a JSON file); `client` a
    gradservice.Client. Each parametrised layer becomes a submodule of that name holding its
    tensors as torch.nn does (`conv1.weight`, `conv1.bias`; `bn1.running_mean`,
    `bn1.running_var` and `bn1.num_batches_tracked` as buffers), so state_dicts move between a
    RemoteNetwork and the matching all-local model. Without `state_dict` every layer is
    initialised by constructing the matching torch.nn.Conv2d, Linear or BatchNorm2d in layer
    order: the same torch.manual_seed gives the same weights as a local model built in the same
    order. With it, the tensors are loaded from it (strictly: every name, no other).

    `net(x)` sends x and the parameters to the server (Forward) and returns the output, and is
    differentiable in x and every parameter. Backward recomputes the forward pass on the
    server, in the same ComputeGradients call that back-propagates dL/dy (a second round trip
    per step); only the gradients autograd needs are asked for: the input's only when x
    requires grad, and only the parameters that require grad. When the loss is the network's
    last step, `net.loss(x, target)` needs one round trip.

    Batch norm follows the module's mode as in torch: after train() (the default) batch
    statistics are used and the running statistics the server returns are copied into the
    buffers, once per forward, and num_batches_tracked incremented; after eval() the running
    statistics are used and left alone. The network's own batch_norm2d.training values are
    replaced by the module's mode.

    The wire carries float32: inputs and parameters of other floating dtypes are converted and
    results cast back to the input's (gradients to each parameter's) dtype. Only CPU tensors
    are accepted. Server failures raise gradservice.GradServiceError. copy.deepcopy(net) has
    tensors of its own and shares `client`.
    """

    def __init__(self, network, client, *, state_dict=None):
        super().__init__()
        if not isinstance(client, Client):
            raise TypeError(f"client: expected a gradservice.Client, got {type(client).__name__}")
        self.client = client
        spec = as_network(network)
        message = spec.to_proto()
        # One message per mode, made once: a call sends one of them as it is.
        self._network_messages = {}
        for training in (True, False):
            mode_message = type(message)()
            mode_message.CopyFrom(message)
            for layer in mode_message.layers:
                if layer.WhichOneof("op") == "batch_norm2d":
                    layer.batch_norm2d.training = training
            self._network_messages[training] = mode_message
        infos = parameter_infos(spec)
        self._trainable_names = [info.name for info in infos if info.trainable]
        self._buffer_names = [info.name for info in infos if not info.trainable]
        self._batch_norm_layers = [layer.name for layer in message.layers
                                   if layer.WhichOneof("op") == "batch_norm2d"]
        by_layer = {}
        for info in infos:
            layer_name, _, attribute = info.name.rpartition(".")
            by_layer.setdefault(layer_name, []).append((attribute, info))
        for index, layer in enumerate(message.layers):
            kind = layer.WhichOneof("op")
            if kind not in _PARAMETRISED_KINDS:
                continue
            self._add_layer(index, layer, kind, by_layer.get(layer.name, []),
                            initialise=state_dict is None)
        if state_dict is not None:
            self.load_state_dict(state_dict)

    def _add_layer(self, index, layer, kind, infos, initialise):
        where = f"layers[{index}] ({layer.name!r})"
        if "." in layer.name:
            raise ValueError(f"{where}: a layer name containing '.' cannot name a submodule")
        if layer.name in self._modules:
            raise ValueError(f"{where}: a second layer of this name")
        module = RemoteLayer(kind)
        if initialise:
            twin = _torch_module(layer)
            tensors = dict(twin.named_parameters())
            tensors.update(twin.named_buffers())
        for attribute, info in infos:
            shape = tuple(info.shape)
            if initialise:
                tensor = tensors[attribute].detach()
                if tuple(tensor.shape) != shape:
                    raise ValueError(f"{where}: torch.nn gives {attribute} the shape "
                                     f"{list(tensor.shape)}, the server {list(shape)}")
            else:
                tensor = torch.empty(shape)
            if info.trainable:
                module.register_parameter(attribute, torch.nn.Parameter(tensor))
            else:
                module.register_buffer(attribute, tensor)
        if kind == "batch_norm2d":
            count = tensors["num_batches_tracked"].detach() if initialise else None
            module.register_buffer("num_batches_tracked",
                                   torch.tensor(0, dtype=torch.long) if count is None else count)
        try:
            self.add_module(layer.name, module)
        except KeyError as error:
            raise ValueError(f"{where}: the name cannot name a submodule: {error}") from None

    def __deepcopy__(self, memo):
        # A copy (copy.deepcopy(model), as for a snapshot of the best weights) has tensors of
        # its own and shares the connection: a gRPC channel cannot be copied.
        memo[id(self.client)] = self.client
        duplicate = type(self).__new__(type(self))
        memo[id(self)] = duplicate
        for key, value in self.__dict__.items():
            duplicate.__dict__[key] = copy.deepcopy(value, memo)
        return duplicate

    def _tensor(self, name):
        layer_name, _, attribute = name.rpartition(".")
        return getattr(self._modules[layer_name], attribute)

    def _trainable_tensors(self):
        return [self._tensor(name) for name in self._trainable_names]

    def _wire_network(self):
        return self._network_messages[self.training]

    def _wire_buffers(self):
        # Copies: the running statistics are overwritten when the response arrives.
        return {name: _to_wire(self._tensor(name), name).copy() for name in self._buffer_names}

    def _wire_params(self, params, buffers):
        wire = {name: _to_wire(param, name) for name, param in zip(self._trainable_names, params)}
        wire.update(buffers)
        return wire

    def _wanted_gradients(self, needs):
        """(input_grad, param_grads) for ComputeGradients from autograd's needs_input_grad of
        (x, *trainable parameters)."""
        wanted = [name for name, need in zip(self._trainable_names, needs[1:]) if need]
        if len(wanted) == len(self._trainable_names):
            return needs[0], "all"
        return needs[0], wanted or "none"

    def _param_grads(self, grads, params, needs):
        result = []
        for name, param, need in zip(self._trainable_names, params, needs):
            if not need:
                result.append(None)
            elif name not in grads:
                raise RuntimeError(f"the server returned no gradient for {name!r}")
            else:
                result.append(_from_wire(grads[name], param.dtype))
        return result

    def _store_running_stats(self, running_stats):
        if not self.training or not self._batch_norm_layers:
            return
        with torch.no_grad():
            for layer_name in self._batch_norm_layers:
                layer = self._modules[layer_name]
                for attribute in ("running_mean", "running_var"):
                    name = f"{layer_name}.{attribute}"
                    if name not in running_stats:
                        raise RuntimeError(f"the server returned no running statistic {name!r} "
                                           "for a batch_norm2d layer in training mode")
                    buffer = getattr(layer, attribute)
                    buffer.copy_(_from_wire(running_stats[name], buffer.dtype))
                layer.num_batches_tracked += 1

    def forward(self, x):
        return _RemoteForward.apply(self, x, *self._trainable_tensors())

    def loss(self, x, target, objective="cross_entropy", label_smoothing=0.0,
             ignore_index=-100):
        """The loss of the network's output on `target` as a 0-dim tensor of x's dtype, computed
        with its gradients in one ComputeGradients call; backward() scales those gradients.

        objective="cross_entropy" is F.cross_entropy(net(x), target, label_smoothing=...,
        ignore_index=...) with target class indices (an integer tensor); objective="mse" is
        F.mse_loss(net(x), target) with target shaped like the output. The target is a
        constant: a target that requires grad is a ValueError.
        """
        if objective not in _OBJECTIVES:
            raise ValueError(f"objective={objective!r}: expected one of {list(_OBJECTIVES)}")
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target: expected a torch.Tensor, got {type(target).__name__}")
        if target.requires_grad:
            raise ValueError("target requires grad: RemoteNetwork.loss differentiates only x "
                             "and the parameters")
        _check_cpu(target, "target")
        if objective == "cross_entropy":
            if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
                raise TypeError(f"target: cross_entropy takes class indices (an integer "
                                f"tensor), got {target.dtype}")
            wire_objective = CrossEntropy(target.to(torch.int64).contiguous().numpy(),
                                          label_smoothing=label_smoothing,
                                          ignore_index=ignore_index)
        else:
            if label_smoothing != 0.0:
                raise ValueError(f"label_smoothing={label_smoothing}: only cross_entropy has it")
            if ignore_index != -100:
                raise ValueError(f"ignore_index={ignore_index}: only cross_entropy has it")
            wire_objective = Mse(_to_wire(target, "target"))
        return _RemoteLoss.apply(self, wire_objective, torch.is_grad_enabled(), x,
                                 *self._trainable_tensors())
