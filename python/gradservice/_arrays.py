"""How arrays given to the client become the tensors it sends.

Float tensors travel as little-endian float32. A C-contiguous float32 array is used as it is (its
memory is framed into the request, see _wire.py); a float64 or float16 array is converted to
float32 (one copy), and a non-contiguous or big-endian one copied into a contiguous
little-endian array. Integer, bool, complex and object arrays are a TypeError naming the
argument, as is anything that is not a numpy array (torch tensors go through
gradservice.torch, which hands numpy views over). Class indices (cross-entropy labels) are
int64; other integer arrays are converted, float arrays refused.
"""

import numpy as np

FLOAT32 = np.dtype("<f4")
INT64 = np.dtype("<i8")
# Converted to float32 rather than refused: the values a float32 network can use.
_CONVERTED_FLOATS = (np.dtype(np.float64), np.dtype(np.float16))


def element_count(shape):
    """The number of elements of a tensor of `shape` (1 for a scalar's ())."""
    return int(np.prod(shape, dtype=np.int64))


def as_float32(value, what):
    """`value` as a C-contiguous little-endian float32 array, without copying when it is one.

    REQUIRES nothing of `value`; raises TypeError naming `what` for anything but a numpy array
    of floats (float32, float64, float16).
    """
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{what}: expected a numpy array of floats, got {type(value).__name__}")
    dtype = value.dtype
    if dtype.kind != "f" or (dtype.newbyteorder("=") != np.dtype(np.float32)
                             and dtype.newbyteorder("=") not in _CONVERTED_FLOATS):
        raise TypeError(f"{what}: expected a numpy array of floats, got {dtype.name}")
    if dtype == FLOAT32 and value.flags.c_contiguous:
        return value
    return np.ascontiguousarray(value, dtype=FLOAT32)


def as_labels(value, what):
    """`value` as a C-contiguous little-endian int64 array of class indices; TypeError naming
    `what` for anything but a numpy array of integers."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{what}: expected a numpy array of int64 class indices, got "
                        f"{type(value).__name__}")
    if value.dtype.kind not in "iu":
        raise TypeError(f"{what}: expected a numpy array of int64 class indices, got "
                        f"{value.dtype.name}")
    if value.dtype == INT64 and value.flags.c_contiguous:
        return value
    return np.ascontiguousarray(value, dtype=INT64)
