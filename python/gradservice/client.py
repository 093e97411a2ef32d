"""gradservice.Client: calls to gradserver (grad.v1.GradientService) with numpy arrays.

    with gradservice.Client("127.0.0.1:50051") as client:
        result = client.compute_gradients(net, params, x, gradservice.Mse(target))
        result.loss, result.input_grad, result.param_grads["conv1.weight"]

Semantics are the C++ client's (client/include/gradclient/client.h):

- Deadline: every call has one, `timeout` seconds from its start (the Client's default 60 s,
  or the call's `timeout=`), covering every retry; None means none.
- Retries: a call that fails with UNAVAILABLE (no connection, a server shutting down) is tried
  again after min(max_backoff, initial_backoff * multiplier^(n-1)) scaled by a random factor in
  [1 - jitter, 1 + jitter] (RetryOptions' defaults: 5 attempts, 50 ms, x2, 2 s, 0.2), never when
  the wait would end past the deadline; every RPC of the service is idempotent.
- Several servers: "127.0.0.1:5001,127.0.0.1:5002" (or gRPC's "ipv4:..." / "dns:///name:port")
  connects to each and spreads calls over the ready ones (round_robin); a retried call can land
  on another. shards=K cuts a call's batch into K parts sent at once (gradservice._sharding);
  a network with a batch_norm2d in training mode cannot be cut (ValueError naming the layer).
- TLS: tls=True (the system's roots) or TlsOptions(root_ca, cert, key, server_name), file
  paths. token="..." sends "authorization: Bearer <token>" with every call but health().
- Messages up to max_message_mb (1024 MiB) each way.
- shared_memory=True (a server on this host with --allow_shared_memory): the tensors of each
  call are copied into a POSIX shared memory region registered with the server, which reads
  them there and writes the results there (gradservice._shm).

Arrays: float tensors are float32; C-contiguous float32 arrays are framed into the request
without an extra copy, float64 and float16 arrays are converted to float32 (a copy), any other
dtype is a TypeError naming the argument. Results are numpy views of the response's bytes
(no copy): read-only, and each keeps the whole response alive; np.array(a) makes a private
writable copy. Results of a shared memory call are writable views of the region instead.

Errors: every failed RPC raises GradServiceError(code, message) with the server's code and
message; arguments the client can check itself raise TypeError / ValueError naming them.

Thread safety: a Client may be used from any number of threads at once.
"""

import concurrent.futures
import dataclasses
import json
import random
import secrets
import threading
import time
import typing

import grpc
from google.protobuf import json_format
import numpy as np

from . import _sharding, _wire
from ._arrays import as_float32, as_labels
from ._proto import gradient_service_pb2 as pb
from .errors import GradServiceError
from .network import Network, as_network, check_rows_independent
from .objectives import CrossEntropy, GradOutput, Mse, Sum, OBJECTIVE_TYPES

_SERVICE = "/grad.v1.GradientService/"
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
MAX_SHARDS = 64  # as gradclient::kMaxShards
# Keepalive while calls are in flight, as the C++ client: a server that stopped answering gets
# its connection closed within about 30 s. gradserver accepts pings this often.
_KEEPALIVE_TIME_MS = 20000
_KEEPALIVE_TIMEOUT_MS = 10000


@dataclasses.dataclass(frozen=True)
class RetryOptions:
    """How UNAVAILABLE is retried; defaults as gradclient::RetryOptions. Durations in seconds."""
    max_attempts: int = 5  # attempts in total, the first included; 1 disables retrying
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    backoff_multiplier: float = 2.0
    jitter: float = 0.2  # in [0, 1)

    def check(self):
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) \
                or self.max_attempts < 1:
            raise ValueError(f"retries.max_attempts={self.max_attempts!r} must be an int >= 1")
        if not 0 < self.initial_backoff <= 3600:
            raise ValueError(f"retries.initial_backoff={self.initial_backoff} must be in (0, 3600]")
        if not self.initial_backoff <= self.max_backoff <= 3600:
            raise ValueError(f"retries.max_backoff={self.max_backoff} must be in "
                             f"[initial_backoff={self.initial_backoff}, 3600]")
        if not self.backoff_multiplier >= 1:
            raise ValueError(f"retries.backoff_multiplier={self.backoff_multiplier} must be >= 1")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"retries.jitter={self.jitter} must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class TlsOptions:
    """TLS on the channel. root_ca: PEM file of the CA(s) to trust (None: the system's roots);
    cert and key: the client's certificate chain and key for mutual TLS (both or neither);
    server_name: the name to check the server's certificate against instead of the target's
    host."""
    root_ca: typing.Optional[str] = None
    cert: typing.Optional[str] = None
    key: typing.Optional[str] = None
    server_name: typing.Optional[str] = None


@dataclasses.dataclass
class ForwardResult:
    """What forward() returns. Arrays are read-only views of the response (module docstring).
    timing: the server's decode/queue/forward/backward/encode_ns (with shards, each the
    slowest part's); attempts: the attempts the call made (the most of any part)."""
    output: np.ndarray
    running_stats: dict
    request_id: str
    timing: dict
    attempts: int


@dataclasses.dataclass
class GradientResult:
    """What compute_gradients() returns; arrays, timing and attempts as in ForwardResult."""
    output: typing.Optional[np.ndarray]  # None with skip_output
    loss: typing.Optional[float]  # None for GradOutput
    input_grad: typing.Optional[np.ndarray]  # None with input_grad=False
    param_grads: dict
    running_stats: dict  # batch_norm2d (training) "<layer>.running_mean" / "running_var"
    request_id: str
    timing: dict
    attempts: int


def _is_ip_with_port(address, ipv6):
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        return False
    import ipaddress  # pylint: disable=import-outside-toplevel
    if ipv6:
        if not (host.startswith("[") and host.endswith("]")):
            return False
        host = host[1:-1]
    try:
        return isinstance(ipaddress.ip_address(host),
                          ipaddress.IPv6Address if ipv6 else ipaddress.IPv4Address)
    except ValueError:
        return False


def channel_target(target):
    """gRPC's target for `target`: a bare list of IP addresses becomes the ipv4:/ipv6: target
    listing them; anything else passes through (as the C++ client's ChannelTarget)."""
    if not isinstance(target, str) or not target:
        raise ValueError(f"target={target!r} is empty; expected host:port")
    if "," not in target or target.startswith(("ipv4:", "ipv6:")):
        return target
    addresses = target.split(",")
    for ipv6 in (False, True):
        if all(_is_ip_with_port(a, ipv6) for a in addresses):
            return ("ipv6:" if ipv6 else "ipv4:") + target
    raise ValueError(f"target={target} lists several addresses, which must all be IP addresses "
                     "with ports (A.B.C.D:PORT or [V6]:PORT); for host names use "
                     "dns:///NAME:PORT with a name that resolves to every server")


def _read_file(option, path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise ValueError(f"{option}={path} cannot be read: {error.strerror}") from None


def _credentials(tls):
    if tls is True:
        tls = TlsOptions()
    if not isinstance(tls, TlsOptions):
        raise TypeError(f"tls: expected None, True or a gradservice.TlsOptions, got "
                        f"{type(tls).__name__}")
    if (tls.cert is None) != (tls.key is None):
        raise ValueError("tls.cert and tls.key must be given together; got only "
                         + ("tls.cert" if tls.key is None else "tls.key"))
    return grpc.ssl_channel_credentials(
        root_certificates=_read_file("tls.root_ca", tls.root_ca) if tls.root_ca else None,
        private_key=_read_file("tls.key", tls.key) if tls.key else None,
        certificate_chain=_read_file("tls.cert", tls.cert) if tls.cert else None), tls


def _check_number(value, what, low, high):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what}: expected a number, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{what}={value} is out of range [{low}, {high}]")


class Client:
    """A connection to one or more gradservers; see the module docstring.

    target: "host:port", "A:P,B:Q" (several servers), or any gRPC target ("dns:///n:p",
    "unix:/path"). timeout: the default deadline of a call, in seconds (None: none). retries:
    attempts in total for UNAVAILABLE, the first included (an int), or a RetryOptions. tls: None
    (plaintext), True, or TlsOptions. token: a bearer token. max_message_mb: 1..2047.
    shared_memory: pass tensors and results through POSIX shared memory (a server on this
    host started with --allow_shared_memory; not with shards > 1).

    Does not connect: the first call does. Close it (or use `with`) to release the channel and
    any shared memory.
    """

    def __init__(self, target, *, timeout=60.0, retries=5, tls=None, token=None,
                 max_message_mb=1024, shared_memory=False):
        self._target = target
        grpc_target = channel_target(target)
        if timeout is not None:
            _check_number(timeout, "timeout", 0, float("inf"))
            if timeout <= 0:
                raise ValueError(f"timeout={timeout} must be positive (or None: no deadline)")
        self._timeout = timeout
        self._retry = retries if isinstance(retries, RetryOptions) else RetryOptions(retries)
        self._retry.check()
        if isinstance(max_message_mb, bool) or not isinstance(max_message_mb, int) \
                or not 1 <= max_message_mb <= 2047:
            raise ValueError(f"max_message_mb={max_message_mb!r} is out of range; expected "
                             "1..2047")
        if token is not None:
            if not isinstance(token, str) or not token or any(
                    c <= " " or c >= "\x7f" for c in token):
                raise ValueError("token may hold only printable ASCII characters other than "
                                 "space")
            self._metadata = (("authorization", f"Bearer {token}"),)
        else:
            self._metadata = ()
        max_bytes = max_message_mb << 20
        options = [
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.max_receive_message_length", max_bytes),
            # Reconnect on the retry schedule, so that a retried call finds a server that has
            # just started (gRPC would otherwise wait 1 s and more).
            ("grpc.initial_reconnect_backoff_ms", max(1, int(self._retry.initial_backoff * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(1, int(self._retry.max_backoff * 1000))),
            ("grpc.keepalive_time_ms", _KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", _KEEPALIVE_TIMEOUT_MS),
            ("grpc.service_config",
             json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
            # The retries here are the client's own, with its backoff and deadline.
            ("grpc.enable_retries", 0),
        ]
        if tls is None or tls is False:
            self._channel = grpc.insecure_channel(grpc_target, options=options)
        else:
            credentials, tls = _credentials(tls)
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            self._channel = grpc.secure_channel(grpc_target, credentials, options=options)
        self._methods = {}
        self._methods_lock = threading.Lock()
        self._shm = None
        if shared_memory:
            from ._shm import SharedMemoryPool  # pylint: disable=import-outside-toplevel
            self._shm = SharedMemoryPool(self)

    @property
    def target(self):
        return self._target

    def close(self):
        """Unregisters and unlinks shared memory, and closes the channel."""
        if self._shm is not None:
            self._shm.close()
            self._shm = None
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- calls

    def forward(self, network, params, input, *, shards=1, request_id=None,  # noqa: A002
                timeout=None):
        """Runs `network` forward on `input` ([N, C, H, W]) with `params` (name -> array).

        Returns a ForwardResult; a batch_norm2d in training mode updates its running statistics
        (running_stats) as model.train() would. shards: cut the batch into that many parts sent
        at once (1..64; module docstring). request_id: echoed by the server (default: random).
        timeout: this call's deadline in seconds (default: the Client's).
        """
        call = self._prepare(network, params, input, None, shards, request_id, timeout)
        skeleton = pb.ForwardRequest(network=call.network, request_id=call.request_id)
        parts = self._run_sharded(call, lambda part: self._forward_once(skeleton, part))
        if len(parts) == 1:
            whole = parts[0]
        else:
            whole = _sharding.combine_forward(parts)
        return ForwardResult(whole["output"], whole["running_stats"], parts[0]["request_id"],
                             _slowest(parts), max(p["attempts"] for p in parts))

    def compute_gradients(self, network, params, input, objective, *,  # noqa: A002
                          input_grad=True, param_grads="all", skip_output=False, shards=1,
                          request_id=None, timeout=None):
        """Runs forward, `objective` (Mse, Sum, GradOutput, CrossEntropy) and backward.

        input_grad: return dL/d(input). param_grads: "all", "none", or a list of parameter
        names. skip_output: leave the output out (result.output None). shards, request_id and
        timeout as for forward(). Returns a GradientResult, whose loss is None for GradOutput.
        """
        if not isinstance(objective, OBJECTIVE_TYPES):
            raise TypeError("objective: expected gradservice.Mse, Sum, GradOutput or "
                            f"CrossEntropy, got {type(objective).__name__}")
        call = self._prepare(network, params, input, objective, shards, request_id, timeout)
        skeleton = pb.ComputeGradientsRequest(network=call.network, request_id=call.request_id,
                                              skip_output=bool(skip_output))
        skeleton.gradients.CopyFrom(_selection(input_grad, param_grads))
        parts = self._run_sharded(call, lambda part: self._gradients_once(skeleton, part))
        if len(parts) == 1:
            whole = parts[0]
        else:
            whole = _sharding.combine_gradients(objective, call.objective_array, call.slices,
                                                parts)
        return GradientResult(whole["output"], whole["loss"], whole["input_grad"],
                              whole["param_grads"], whole["running_stats"], parts[0]["request_id"],
                              _slowest(parts), max(p["attempts"] for p in parts))

    def info(self, *, timeout=None):
        """GetInfo as a dict in protobuf's JSON mapping with the proto's snake_case names (int64
        fields are strings there, as protobuf writes them); fields at their defaults included."""
        response, _ = self._call("GetInfo", b"", self._deadline(timeout))
        return json_format.MessageToDict(pb.GetInfoResponse.FromString(response),
                                         preserving_proto_field_name=True,
                                         including_default_value_fields=True)

    def health(self, service="", *, timeout=None):
        """The grpc.health.v1 status of `service` ("" = the server): "SERVING", "NOT_SERVING",
        "UNKNOWN" or "SERVICE_UNKNOWN". Sends no token."""
        response, _ = self._call(_HEALTH_CHECK, _wire.encode_health_request(service),
                                 self._deadline(timeout), send_token=False)
        try:
            return _wire.decode_health_response(response)
        except _wire.MalformedResponse as error:
            raise GradServiceError(grpc.StatusCode.INTERNAL,
                                   f"malformed Health/Check response from {self._target}: "
                                   f"{error}") from None

    # ---- internals

    def _deadline(self, timeout):
        if timeout is None:
            timeout = self._timeout
        elif isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
            raise ValueError(f"timeout={timeout!r} must be a number >= 0")
        return None if timeout is None else time.monotonic() + timeout

    def _prepare(self, network, params, input_array, objective, shards, request_id, timeout):
        call = _Call()
        call.deadline = self._deadline(timeout)
        if isinstance(network, pb.Network):
            call.network = network
            call.spec = None
        else:
            call.spec = as_network(network)
            call.network = call.spec.to_proto()
        if not isinstance(params, typing.Mapping):
            raise TypeError(f"params: expected a mapping of parameter names to arrays, got "
                            f"{type(params).__name__}")
        for name in params:
            if not isinstance(name, str):
                raise TypeError(f"params: names must be str, got {type(name).__name__} {name!r}")
        call.param_names = sorted(params)
        # Sorted by name, as the C++ client sends them; the server needs no order.
        call.param_arrays = [as_float32(params[name], f"params[{name!r}]")
                             for name in call.param_names]
        call.input_array = as_float32(input_array, "input")
        call.objective = objective
        call.objective_array = None
        if isinstance(objective, Mse):
            call.objective_array = as_float32(objective.target, "objective.target")
        elif isinstance(objective, GradOutput):
            call.objective_array = as_float32(objective.grad, "objective.grad")
        elif isinstance(objective, CrossEntropy):
            call.objective_array = as_labels(objective.labels, "objective.labels")
            _check_number(objective.label_smoothing, "objective.label_smoothing", 0.0, 1.0)
            if isinstance(objective.ignore_index, bool) or not isinstance(
                    objective.ignore_index, (int, np.integer)):
                raise TypeError("objective.ignore_index: expected an int, got "
                                f"{type(objective.ignore_index).__name__}")
        if isinstance(shards, bool) or not isinstance(shards, int):
            raise TypeError(f"shards: expected an int, got {type(shards).__name__}")
        if not 1 <= shards <= MAX_SHARDS:
            raise ValueError(f"shards={shards} is out of range 1..{MAX_SHARDS}")
        if shards > 1:
            if self._shm is not None:
                raise ValueError(f"shards={shards} with shared_memory=True: results can be "
                                 "placed in shared memory only by unsharded calls")
            spec = call.spec if call.spec is not None else Network.from_proto(call.network)
            check_rows_independent(spec, shards)
        if request_id is None:
            request_id = secrets.token_hex(8)
        elif not isinstance(request_id, str):
            raise TypeError(f"request_id: expected a str, got {type(request_id).__name__}")
        call.request_id = request_id
        batch = _sharding.shardable_batch(call.input_array, call.objective_array, objective) \
            if shards > 1 else 0
        call.slices = _sharding.split_batch(batch, shards) if batch >= 2 else [None]
        return call

    def _run_sharded(self, call, once):
        """once(part) for the whole call, or for each slice of its batch at once (parts 1.. on
        threads of their own, part 0 on the caller's); the decoded results in batch order. The
        first part to fail, in batch order, fails the call, its message naming the part."""
        if call.slices == [None]:
            return [once(call)]
        parts = [call.part(s) for s in call.slices]
        with concurrent.futures.ThreadPoolExecutor(len(parts) - 1) as pool:
            futures = [pool.submit(once, part) for part in parts[1:]]
            outcomes = [_outcome(once, parts[0])] + [_outcome(f.result) for f in futures]
        for i, (result, error) in enumerate(outcomes):
            if error is not None:
                begin, end = call.slices[i]
                if isinstance(error, GradServiceError):
                    raise GradServiceError(error.code,
                                           f"shard {i + 1} of {len(parts)} (batch rows {begin}.."
                                           f"{end - 1}): {error.message}") from None
                raise error
        return [result for result, _ in outcomes]

    def _tensors(self, call, lease):
        """Headers of the call's tensors (references into shared memory when `lease` holds
        them)."""
        refs = lease.refs if lease is not None else {}
        params = [pb.NamedTensor(name=name, tensor=_wire.tensor_header(array, ref=refs.get(i)))
                  for i, (name, array) in enumerate(zip(call.param_names, call.param_arrays))]
        return params, _wire.tensor_header(call.input_array, ref=refs.get("input")), refs

    def _call_once(self, method, base, call, frame, decode, add_objective=None):
        """One unsharded call of `method`: `base` (the request without its tensors) completed
        with the tensor headers of `call` (references into shared memory when a lease holds
        them) and `add_objective(skeleton, refs)`, framed around the arrays by `frame` and
        the response decoded by `decode`."""
        lease = self._shm.acquire(call, base) if self._shm is not None else None
        try:
            skeleton = type(base)()
            skeleton.CopyFrom(base)
            params, input_header, refs = self._tensors(call, lease)
            skeleton.parameters.extend(params)
            skeleton.input.CopyFrom(input_header)
            if add_objective is not None:
                add_objective(skeleton, refs)
            if lease is not None:
                lease.fill_placement(skeleton.placement)
            request = _wire.join(frame(skeleton))
            response, attempts = self._call(method, request, call.deadline)
            decoded = self._decode(decode, response, method, lease)
        finally:
            if lease is not None:
                lease.release_unless_used()
        decoded["attempts"] = attempts
        return decoded

    def _forward_once(self, base, call):
        return self._call_once(
            "Forward", base, call,
            lambda skeleton: _wire.frame_forward(skeleton, call.param_arrays, call.input_array),
            _wire.decode_forward)

    def _gradients_once(self, base, call):
        def add_objective(skeleton, refs):
            objective = call.objective
            if isinstance(objective, Mse):
                skeleton.objective.mse_target.CopyFrom(
                    _wire.tensor_header(call.objective_array, ref=refs.get("objective")))
            elif isinstance(objective, GradOutput):
                skeleton.objective.grad_output.CopyFrom(
                    _wire.tensor_header(call.objective_array, ref=refs.get("objective")))
            elif isinstance(objective, Sum):
                skeleton.objective.sum.SetInParent()
            else:
                ce = skeleton.objective.cross_entropy
                # Class indices always go as bytes: a region holds floats.
                ce.target.CopyFrom(_wire.tensor_header(call.objective_array,
                                                       dtype=pb.DATA_TYPE_INT64))
                ce.label_smoothing = float(objective.label_smoothing)
                ce.ignore_index = int(objective.ignore_index)

        return self._call_once(
            "ComputeGradients", base, call,
            lambda skeleton: _wire.frame_gradients(skeleton, call.param_arrays,
                                                   call.input_array, call.objective_array),
            _wire.decode_gradients, add_objective)

    def _decode(self, decode, response, method, lease):
        try:
            return decode(response, lease.resolve if lease is not None else None)
        except _wire.MalformedResponse as error:
            raise GradServiceError(grpc.StatusCode.INTERNAL,
                                   f"malformed {method} response from {self._target}: "
                                   f"{error}") from None

    def _method(self, name):
        with self._methods_lock:
            method = self._methods.get(name)
            if method is None:
                path = name if name.startswith("/") else _SERVICE + name
                # No (de)serializers: requests are framed here and responses decoded here.
                method = self._channel.unary_unary(path)
                self._methods[name] = method
            return method

    def _call(self, name, request, deadline, send_token=True):
        """Sends `request` (serialized bytes) to method `name`, retrying UNAVAILABLE as the
        module docstring says; returns (response bytes, attempts)."""
        method = self._method(name)
        retry = self._retry
        backoff = retry.initial_backoff
        metadata = self._metadata if send_token else ()
        attempt = 1
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return method(request, timeout=timeout, metadata=metadata), attempt
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt >= retry.max_attempts:
                    raise GradServiceError.from_rpc_error(error) from None
                wait = backoff
                if retry.jitter > 0:
                    wait *= random.uniform(1.0 - retry.jitter, 1.0 + retry.jitter)
                if deadline is not None and time.monotonic() + wait >= deadline:
                    raise GradServiceError.from_rpc_error(error) from None
            time.sleep(wait)
            backoff = min(retry.max_backoff, backoff * retry.backoff_multiplier)
            attempt += 1


class _Call:
    """One Forward / ComputeGradients call's checked arguments."""

    def part(self, rows):
        """The call for rows [begin, end) of the batch: views, no copies."""
        begin, end = rows
        part = _Call()
        part.__dict__.update(self.__dict__)
        part.input_array = self.input_array[begin:end]
        if self.objective_array is not None:
            part.objective_array = self.objective_array[begin:end]
        part.slices = [None]
        return part


def _outcome(function, *args):
    try:
        return function(*args), None
    except Exception as error:  # pylint: disable=broad-except -- re-raised in batch order
        return None, error


def _slowest(parts):
    timing = _wire.empty_timing()
    for part in parts:
        for key, value in part["timing"].items():
            timing[key] = max(timing[key], value)
    return timing


def _selection(input_grad, param_grads):
    selection = pb.GradientSelection(skip_input=not input_grad)
    if isinstance(param_grads, str):
        if param_grads == "none":
            selection.no_parameters = True
        elif param_grads != "all":
            raise ValueError(f"param_grads={param_grads!r}; expected 'all', 'none' or a list of "
                             "parameter names")
        return selection
    try:
        names = list(param_grads)
    except TypeError:
        raise TypeError(f"param_grads: expected 'all', 'none' or a list of parameter names, got "
                        f"{type(param_grads).__name__}") from None
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"param_grads: names must be str, got {type(name).__name__}")
    if names:
        selection.parameters.extend(names)
    else:
        selection.no_parameters = True  # an empty list asks for none, not (as on the wire) all
    return selection

