"""Shared memory for a Client on the same host as its gradserver (Client(shared_memory=True)).

The client keeps a pool of POSIX shared memory regions, each registered with the server the
way the C++ client registers one (client/shared_memory.cc): an object "gradclient-<pid>-<random
hex>" in /dev/shm (what shm_open names), mode 0600, its pages reserved with posix_fallocate,
mapped read-write, and 32 random bytes written at its start as the proof that the caller can
write it (RegisterSharedMemory checks them when it maps the object). Once the server has mapped
it the name is unlinked, so nothing is left behind however the process ends; both mappings
stay valid.

A call takes a region no earlier call's results still live in (or registers a new one large
enough, retiring free ones that are too small), copies its float tensors into it (one copy
each; cross-entropy labels go as bytes, a region holds floats), sends references instead of
bytes, and asks the server to write the output, the input gradient and the parameter gradients
(by name) into it, each at a 64-byte boundary. The results are then writable numpy views of
the region, and the region goes back to the pool once every result array of the call (and every
view of one) has been garbage collected. Keep np.array(result) copies to hold many calls'
results at once: each call holding on to a region needs one of the server's
--max_shared_memory_regions.

Running statistics still come back as bytes. Only for a server on this host started with
--allow_shared_memory (others answer FAILED_PRECONDITION or PERMISSION_DENIED).
"""

import collections
import mmap
import os
import secrets
import threading
import weakref

import numpy as np

from . import _wire
from ._arrays import FLOAT32, element_count
from ._proto import gradient_service_pb2 as pb
from .network import Network, as_network, output_shape, parameter_infos
from .objectives import GradOutput, Mse

KEY_PREFIX = "gradclient-"  # as gradwire::kSharedMemoryKeyPrefix; the server refuses others
ALIGNMENT = 64  # of every tensor and result, as gradclient::SharedMemoryRegion::kAlignment
HEADER_BYTES = ALIGNMENT  # holds the proof; never handed out
PROOF_BYTES = 32
MIN_REGION_BYTES = 1 << 20
_SHM_DIR = "/dev/shm"


def _aligned(size):
    return (size + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


class Region:
    """One mapped shared memory object of `byte_size` bytes (header included)."""

    def __init__(self, name, byte_size):
        self.name = name
        self.key = f"{KEY_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        self.byte_size = byte_size
        self.path = os.path.join(_SHM_DIR, self.key)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # the umask applies to os.open; the server's access needs this
            os.ftruncate(fd, byte_size)
            # Reserve the pages now, so that touching them later cannot SIGBUS on a full /dev/shm.
            os.posix_fallocate(fd, 0, byte_size)
            self.map = mmap.mmap(fd, byte_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(fd)
            self.unlink()
            raise
        os.close(fd)
        self.bytes = np.frombuffer(self.map, np.uint8)

    def write_proof(self):
        proof = secrets.token_bytes(PROOF_BYTES)
        self.bytes[:PROOF_BYTES] = np.frombuffer(proof, np.uint8)
        return proof

    def view(self, offset, shape, dtype):
        """An array of `shape` at `offset`: a reshaped view of a flat np.frombuffer array, which
        holds a buffer export of the mapping (so the mapping cannot be closed under it)."""
        return np.frombuffer(self.map, dtype, element_count(shape), offset).reshape(shape)

    def unlink(self):
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self):
        self.bytes = None
        try:
            self.map.close()
        except BufferError:
            pass  # result arrays still view it; the mapping goes with the last of them


class Lease:
    """One call's use of a region: where its tensors and results lie."""

    def __init__(self, pool, region, refs, placement):
        self._pool = pool
        self.region = region
        self.refs = refs  # parameter index, "input" or "objective" -> SharedMemoryRef
        self._placement = placement  # a filled grad.v1.ResultPlacement, or None
        self._results = []

    def fill_placement(self, placement):
        if self._placement is not None:
            placement.CopyFrom(self._placement)

    def resolve(self, ref, shape, dtype, what):
        """The result the server wrote at `ref`, as a writable view of the region."""
        size = element_count(shape) * dtype.itemsize
        if (ref.region != self.region.name or ref.offset < HEADER_BYTES or ref.byte_size != size
                or ref.offset + size > self.region.byte_size or ref.offset % dtype.itemsize):
            raise _wire.MalformedResponse(
                f"{what} names {ref.region!r} offset {ref.offset} byte_size {ref.byte_size}, "
                f"not the {size} bytes this call placed in region {self.region.name!r}")
        array = self.region.view(ref.offset, shape, dtype)
        # numpy makes every view of `array` a view of array.base, the flat np.frombuffer array
        # over the mapping, so the region is in use for as long as that one lives.
        self._results.append(array.base)
        return array

    def release_unless_used(self):
        """Ends the call: the region is free again once its result arrays are all gone."""
        results, self._results = self._results, []
        if not results:
            self._pool.give_back(self.region)
            return
        pending = [len(results)]
        lock = threading.Lock()

        def one_gone(pool=self._pool, region=self.region):
            with lock:
                pending[0] -= 1
                last = pending[0] == 0
            if last:
                pool.released.append(region)  # deque.append: safe from a finalizer, any thread

        for array in results:
            weakref.finalize(array, one_gone)


class SharedMemoryPool:
    """The regions of one Client; see the module docstring. Thread-safe."""

    def __init__(self, client):
        self._client = client
        self._lock = threading.Lock()
        self._free = []
        self._regions = {}
        self.released = collections.deque()
        self._closed = False

    def give_back(self, region):
        self.released.append(region)

    def _collect_released(self):
        while self.released:
            region = self.released.popleft()
            if region.name in self._regions:
                self._free.append(region)

    def acquire(self, call, base):
        """A Lease for `call`, whose request skeleton so far is `base`: its tensors copied into a
        region and the placement of its results there."""
        inputs = [(i, a) for i, a in enumerate(call.param_arrays)] + [("input", call.input_array)]
        if isinstance(call.objective, (Mse, GradOutput)):
            inputs.append(("objective", call.objective_array))
        inputs = [(key, array) for key, array in inputs if array.nbytes > 0]
        results = _results(call, base)
        needed = HEADER_BYTES + sum(_aligned(a.nbytes) for _, a in inputs) + sum(
            _aligned(size) for _, _, size in results)
        region = self._take(needed, call.deadline)
        offset = HEADER_BYTES
        refs = {}
        for key, array in inputs:
            region.view(offset, array.shape, array.dtype)[...] = array
            refs[key] = pb.SharedMemoryRef(region=region.name, offset=offset,
                                           byte_size=array.nbytes)
            offset += _aligned(array.nbytes)
        placement = None
        if results:
            placement = pb.ResultPlacement()
            for field, name, size in results:
                ref = pb.SharedMemoryRef(region=region.name, offset=offset, byte_size=size)
                if field == "parameter_grads":
                    placement.parameter_grads.add(name=name, ref=ref)
                else:
                    getattr(placement, field).CopyFrom(ref)
                offset += _aligned(size)
        return Lease(self, region, refs, placement)

    def _take(self, needed, deadline):
        with self._lock:
            if self._closed:
                raise ValueError("the client is closed")
            self._collect_released()
            fitting = [r for r in self._free if r.byte_size >= needed]
            if fitting:
                region = min(fitting, key=lambda r: r.byte_size)
                self._free.remove(region)
                return region
            # Free regions too small for this call would only count against the server's
            # limit on regions.
            retired = [r for r in self._free if r.byte_size < needed]
            self._free = [r for r in self._free if r.byte_size >= needed]
            for region in retired:
                del self._regions[region.name]
        for region in retired:
            self._unregister(region.name, deadline)
            region.close()
        region = Region(f"py-{os.getpid()}-{secrets.token_hex(6)}",
                        max(_aligned(needed), MIN_REGION_BYTES))
        try:
            request = pb.RegisterSharedMemoryRequest(name=region.name, key=region.key, offset=0,
                                                     byte_size=region.byte_size,
                                                     proof=region.write_proof())
            self._client._call("RegisterSharedMemory",  # pylint: disable=protected-access
                               request.SerializeToString(), deadline)
        except BaseException:
            region.close()
            raise
        finally:
            region.unlink()
        with self._lock:
            self._regions[region.name] = region
        return region

    def _unregister(self, name, deadline):
        request = pb.UnregisterSharedMemoryRequest(name=name)
        try:
            self._client._call("UnregisterSharedMemory",  # pylint: disable=protected-access
                               request.SerializeToString(), deadline)
        except Exception:  # pylint: disable=broad-except
            pass  # best effort: a server that is gone has unmapped it already

    def close(self):
        with self._lock:
            self._closed = True
            regions = list(self._regions.values())
            self._regions.clear()
            self._free.clear()
        deadline = self._client._deadline(5.0)  # pylint: disable=protected-access
        for region in regions:
            self._unregister(region.name, deadline)
            region.close()


def _results(call, base):
    """(placement field, parameter name, bytes) of each result the call returns, in the C++
    client's order: the output, the input gradient, the parameter gradients by name. Empty
    when the network's shapes cannot be followed here (the server then reports why)."""
    try:
        network = call.spec if call.spec is not None else Network.from_proto(call.network)
        out_shape = output_shape(as_network(network), call.input_array.shape)
        infos = parameter_infos(network)
    except (ValueError, TypeError):
        return []
    float_bytes = FLOAT32.itemsize
    results = []
    gradients = isinstance(base, pb.ComputeGradientsRequest)
    if not (gradients and base.skip_output):
        results.append(("output", "", element_count(out_shape) * float_bytes))
    if not gradients:
        return results
    selection = base.gradients
    if not selection.skip_input:
        results.append(("input_grad", "", call.input_array.nbytes))
    wanted = set(selection.parameters)
    for info in sorted(infos, key=lambda p: p.name):
        if info.trainable and not selection.no_parameters and (not wanted or info.name in wanted):
            results.append(("parameter_grads", info.name,
                            element_count(info.shape) * float_bytes))
    return results
