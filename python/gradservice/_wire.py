"""Request framing and response decoding, with each tensor byte copied at most once.

Requests: the caller builds a skeleton message (grad.v1.ForwardRequest or
ComputeGradientsRequest) whose tensors carry their shape and dtype but no data, and hands the
arrays over; frame_* returns the serialized request as a list of pieces: the skeleton's
protobuf-serialized fields and, in the place of each tensor's `data` field, its tag, its length
and a memoryview of the array. b"".join(pieces) copies every tensor once, straight into the
message gRPC sends; the bytes equal skeleton-with-data.SerializeToString() (tests check it),
because protobuf writes fields in field-number order and each piece below is one field range.

Responses: decode_* walk the serialized response and return every tensor as np.frombuffer
over the response's bytes: no copy at all. Such arrays are read-only (the bytes object is
immutable) and keep the whole response alive; copy one (np.array(a)) to modify it or to let
the rest go. A tensor the server placed in shared memory is resolved by `resolve_ref`.
"""

import numpy as np

from ._arrays import FLOAT32, INT64, element_count
from ._proto import gradient_service_pb2 as pb

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_DTYPES = {pb.DATA_TYPE_FLOAT32: FLOAT32, pb.DATA_TYPE_INT64: INT64}


class MalformedResponse(ValueError):
    """A response that does not decode; the client reports it as INTERNAL."""


def _varint(value):
    out = bytearray()
    value &= (1 << 64) - 1  # negative int64 as protobuf writes it: ten bytes
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _length_delimited(field, pieces):
    """Field `field` (wire type 2) holding the concatenation of `pieces`."""
    size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in pieces)
    return [_varint(field << 3 | _LENGTH) + _varint(size)] + pieces


def _fields_of(message, numbers):
    """The serialized fields of `message` whose numbers are in `numbers`, in protobuf's order."""
    part = type(message)()
    part.CopyFrom(message)
    for descriptor in part.DESCRIPTOR.fields:
        if descriptor.number not in numbers:
            part.ClearField(descriptor.name)
    return part.SerializeToString()


def _tensor(header, array):
    """A Tensor's serialized fields: shape and dtype from `header`, `array`'s bytes as data
    (unless the header names shared memory), then the header's shared_memory."""
    pieces = [_fields_of(header, {1, 2})]
    if array is not None and array.nbytes > 0 and not header.HasField("shared_memory"):
        pieces += _length_delimited(3, [memoryview(array).cast("B")])
    if header.HasField("shared_memory"):
        pieces.append(_fields_of(header, {4}))
    return pieces


def tensor_header(array, dtype=pb.DATA_TYPE_FLOAT32, ref=None):
    """A grad.v1.Tensor with `array`'s shape and `dtype`, no data, and `ref` if given."""
    header = pb.Tensor(shape=array.shape, dtype=dtype)
    if ref is not None:
        header.shared_memory.CopyFrom(ref)
    return header


def _parameters(skeleton, arrays):
    pieces = []
    for named, array in zip(skeleton.parameters, arrays):
        inner = [_fields_of(named, {1})] + _length_delimited(2, _tensor(named.tensor, array))
        pieces += _length_delimited(2, inner)
    return pieces


def frame_forward(skeleton, parameter_arrays, input_array):
    """The pieces of a ForwardRequest: skeleton.parameters[i] gets parameter_arrays[i]'s bytes,
    skeleton.input input_array's."""
    pieces = [_fields_of(skeleton, {1})]
    pieces += _parameters(skeleton, parameter_arrays)
    pieces += _length_delimited(3, _tensor(skeleton.input, input_array))
    pieces.append(_fields_of(skeleton, {4, 5}))
    return pieces


def frame_gradients(skeleton, parameter_arrays, input_array, objective_array):
    """The pieces of a ComputeGradientsRequest; as frame_forward, and objective_array is the
    bytes of the objective's tensor (mse_target, grad_output or cross_entropy.target)."""
    pieces = [_fields_of(skeleton, {1})]
    pieces += _parameters(skeleton, parameter_arrays)
    pieces += _length_delimited(3, _tensor(skeleton.input, input_array))
    objective = skeleton.objective
    if skeleton.HasField("objective"):
        inner = []
        if objective.HasField("mse_target"):
            inner += _length_delimited(1, _tensor(objective.mse_target, objective_array))
        inner.append(_fields_of(objective, {2}))
        if objective.HasField("grad_output"):
            inner += _length_delimited(3, _tensor(objective.grad_output, objective_array))
        if objective.HasField("cross_entropy"):
            ce = objective.cross_entropy
            ce_pieces = []
            if ce.HasField("target"):
                ce_pieces += _length_delimited(1, _tensor(ce.target, objective_array))
            ce_pieces.append(_fields_of(ce, {2, 3}))
            inner += _length_delimited(4, ce_pieces)
        pieces += _length_delimited(4, inner)
    pieces.append(_fields_of(skeleton, {5, 6, 7, 8}))
    return pieces


def join(pieces):
    """The serialized request: every tensor's bytes copied once, into the result."""
    return b"".join(pieces)


# ---- Responses


def _read_varint(buf, pos, end):
    result = 0
    shift = 0
    while True:
        if pos >= end or shift > 63:
            raise MalformedResponse("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _signed64(value):
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(buf, pos, end):
    """Yields (number, wire_type, value, start, stop) for each field in buf[pos:end]: value is
    the integer of a varint / fixed field, and [start, stop) the payload of a length-delimited
    one."""
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, pos = _read_varint(buf, pos, end)
            yield number, wire_type, value, pos, pos
        elif wire_type == _FIXED64:
            if pos + 8 > end:
                raise MalformedResponse(f"field {number} is truncated")
            yield number, wire_type, int.from_bytes(buf[pos:pos + 8], "little"), pos, pos + 8
            pos += 8
        elif wire_type == _LENGTH:
            size, pos = _read_varint(buf, pos, end)
            if pos + size > end:
                raise MalformedResponse(f"field {number} is truncated")
            yield number, wire_type, size, pos, pos + size
            pos += size
        elif wire_type == _FIXED32:
            if pos + 4 > end:
                raise MalformedResponse(f"field {number} is truncated")
            yield number, wire_type, 0, pos, pos + 4
            pos += 4
        else:
            raise MalformedResponse(f"field {number} has wire type {wire_type}")


def _decode_tensor(buf, start, end, what, resolve_ref):
    shape = []
    dtype = pb.DATA_TYPE_UNSPECIFIED
    data = None
    ref = None
    for number, wire_type, value, s, e in _fields(buf, start, end):
        if number == 1 and wire_type == _LENGTH:
            pos = s
            while pos < e:
                dim, pos = _read_varint(buf, pos, e)
                shape.append(_signed64(dim))
        elif number == 1 and wire_type == _VARINT:
            shape.append(_signed64(value))
        elif number == 2 and wire_type == _VARINT:
            dtype = value
        elif number == 3 and wire_type == _LENGTH:
            data = (s, e)
        elif number == 4 and wire_type == _LENGTH:
            ref = pb.SharedMemoryRef.FromString(buf[s:e])
    if dtype not in _DTYPES:
        raise MalformedResponse(f"{what}.dtype={dtype} is not one this client reads")
    if any(d < 0 for d in shape):
        raise MalformedResponse(f"{what}.shape={shape} has a negative dim")
    numpy_dtype = _DTYPES[dtype]
    count = element_count(shape)
    if ref is not None and data is None:
        if resolve_ref is None:
            raise MalformedResponse(f"{what} names shared memory this call did not give")
        return resolve_ref(ref, shape, numpy_dtype, what)
    start, stop = data if data is not None else (end, end)
    if stop - start != count * numpy_dtype.itemsize:
        raise MalformedResponse(f"{what}.data has {stop - start} bytes, but shape={shape} needs "
                                f"{count * numpy_dtype.itemsize}")
    if count == 0:
        return np.empty(shape, numpy_dtype)
    return np.frombuffer(buf, dtype=numpy_dtype, count=count, offset=start).reshape(shape)


def _decode_named(buf, start, end, what, resolve_ref):
    name = ""
    tensor = None
    for number, wire_type, _, s, e in _fields(buf, start, end):
        if number == 1 and wire_type == _LENGTH:
            name = bytes(buf[s:e]).decode("utf-8", errors="replace")
        elif number == 2 and wire_type == _LENGTH:
            tensor = (s, e)
    if tensor is None:
        raise MalformedResponse(f"{what} ({name!r}) has no tensor")
    return name, _decode_tensor(buf, tensor[0], tensor[1], f"{what}({name!r})", resolve_ref)


# The keys of a result's `timing`: grad.v1.Timing's fields, in nanoseconds.
_TIMING_FIELDS = tuple(field.name for field in pb.Timing.DESCRIPTOR.fields)


def _timing(buf, s, e):
    timing = pb.Timing.FromString(buf[s:e])
    return {name: getattr(timing, name) for name in _TIMING_FIELDS}


def empty_timing():
    return dict.fromkeys(_TIMING_FIELDS, 0)


def decode_forward(buf, resolve_ref=None):
    """A serialized ForwardResponse as a dict: output, running_stats, request_id, timing."""
    out = {"output": None, "running_stats": {}, "request_id": "", "timing": empty_timing()}
    for number, wire_type, _, s, e in _fields(buf, 0, len(buf)):
        if wire_type != _LENGTH:
            continue
        if number == 1:
            out["output"] = _decode_tensor(buf, s, e, "output", resolve_ref)
        elif number == 2:
            out["request_id"] = bytes(buf[s:e]).decode("utf-8", errors="replace")
        elif number == 3:
            out["timing"] = _timing(buf, s, e)
        elif number == 4:
            name, array = _decode_named(buf, s, e, "running_stats", None)
            out["running_stats"][name] = array
    return out


def decode_gradients(buf, resolve_ref=None):
    """A serialized ComputeGradientsResponse as a dict: output, loss, input_grad, param_grads,
    running_stats, request_id, timing (absent tensors None, an absent loss None)."""
    out = {"output": None, "loss": None, "input_grad": None, "param_grads": {},
           "running_stats": {}, "request_id": "", "timing": empty_timing()}
    for number, wire_type, value, s, e in _fields(buf, 0, len(buf)):
        if number == 2 and wire_type == _FIXED64:
            out["loss"] = float(np.frombuffer(value.to_bytes(8, "little"), "<f8")[0])
        elif wire_type != _LENGTH:
            continue
        elif number == 1:
            out["output"] = _decode_tensor(buf, s, e, "output", resolve_ref)
        elif number == 3:
            out["input_grad"] = _decode_tensor(buf, s, e, "input_grad", resolve_ref)
        elif number == 4:
            name, array = _decode_named(buf, s, e, "parameter_grads", resolve_ref)
            out["param_grads"][name] = array
        elif number == 5:
            out["request_id"] = bytes(buf[s:e]).decode("utf-8", errors="replace")
        elif number == 6:
            out["timing"] = _timing(buf, s, e)
        elif number == 7:
            name, array = _decode_named(buf, s, e, "running_stats", None)
            out["running_stats"][name] = array
    return out


# ---- grpc.health.v1, which Debian ships no Python module for: its two messages by hand.

HEALTH_STATUSES = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")


def encode_health_request(service):
    """grpc.health.v1.HealthCheckRequest { string service = 1; }."""
    if not service:
        return b""
    return b"".join(_length_delimited(1, [service.encode("utf-8")]))


def decode_health_response(buf):
    """grpc.health.v1.HealthCheckResponse { ServingStatus status = 1; } as its name."""
    status = 0
    for number, wire_type, value, _, _ in _fields(buf, 0, len(buf)):
        if number == 1 and wire_type == _VARINT:
            status = value
    if status >= len(HEALTH_STATUSES):
        raise MalformedResponse(f"status={status} is not a ServingStatus")
    return HEALTH_STATUSES[status]
