#!/usr/bin/env python3
"""Writes format_cases.txt: float32 tensors and what PyTorch prints for each.

tensor_format_test.cc reads the output and checks that FormatTensorLikeTorch reproduces every
string. Regenerate after changing the cases (the output is deterministic):

    /usr/bin/python3 client/testdata/make_format_cases.py > client/testdata/format_cases.txt

With --from FILE it instead reads case blocks (case, shape and values lines; anything else is
ignored) from FILE and writes them back with what torch prints; tensor_format_test.cc uses this
to compare randomly generated tensors against the installed torch.

File format, one block per case:

    case <name>
    shape <d0> <d1> ...          (nothing after "shape" for a 0-d tensor)
    values <hex> <hex> ...       (IEEE-754 float32 bit patterns, row-major)
    expected <n>
    <n lines: str(tensor) verbatim>
"""

import sys

import numpy as np
import torch

EXPECTED_TORCH = "1.13"


def f32(values):
    return np.asarray(values, dtype=np.float32)


def cases():
    rng = np.random.RandomState(20240607)

    def normal(shape, scale=1.0):
        return f32(rng.standard_normal(shape) * scale)

    def uniform(shape, low, high):
        return f32(rng.uniform(low, high, shape))

    # Image-like: mostly zeros, some pixels in (0, 1]; fixed notation.
    image = np.zeros((1, 1, 28, 28), dtype=np.float32)
    image[0, 0, 6:22, 8:20] = uniform((16, 12), 0.0, 1.0)
    yield "image_1x1x28x28_fixed", image
    # A gradient of that image: small values of both signs, scientific notation.
    yield "grad_1x1x28x28_sci", normal((1, 1, 28, 28), 1e-2)
    yield "conv_weight_8x1x3x3", normal((8, 1, 3, 3), 0.3)
    # Summarized: elements that are not printed hold values that would force scientific
    # notation (and a wider field) if the formatter looked at them.
    weight = normal((64, 32, 3, 3), 0.05)
    weight[10, 5, 1, 1] = 1.0e9
    weight[30, 3, 0, 2] = -1.0e-12
    weight[5, 20, 2, 2] = float("nan")
    yield "conv_weight_64x32x3x3_summarized", weight
    yield "bias_8", normal((8,), 0.1)
    yield "vector_8_positive", uniform((8,), 0.5, 2.0)
    yield "tiny_values", normal((2, 5), 1e-7)
    yield "huge_values", normal((2, 5), 1e10)
    yield "mixed_signs_and_magnitudes", f32([[-123.456, 0.001, 7.5], [42.0, -0.25, 999.9]])
    yield "fixed_ratio_just_below_1000", f32([0.001, 0.999])
    yield "sci_ratio_just_above_1000", f32([0.001, 1.0011])
    yield "sci_min_below_1e-4", f32([0.5, 0.00009])
    yield "sci_max_above_1e8", f32([2.5e8, 3.5e8])
    yield "integral", f32([1, -3, 2, 0])
    yield "integral_2d", f32([[1, 2, 3], [-40, 50, 600]])
    yield "integral_ratio_above_1000", f32([1, 2000])
    yield "integral_above_1e8", f32([1e9, 2e9])
    yield "integral_large_fixed", f32([12345678, -99999999])
    yield "integral_with_tiny_not_sci", f32([1, 3, 7])
    yield "all_zeros_2x3", np.zeros((2, 3), dtype=np.float32)
    yield "negative_zero_int_mode", f32([-0.0, 0.0, 1.0])
    yield "negative_zero_fixed", f32([-0.0, 0.5, -1.25])
    yield "negative_zero_sci", f32([-0.0, 1e-5, 3.0])
    yield "only_negative_zero", f32([-0.0])
    yield "nan_inf_int_mode", f32([1.0, float("nan"), float("inf"), float("-inf")])
    yield "nan_inf_fixed", f32([1.5, float("nan"), float("inf"), float("-inf"), -2.25])
    yield "nan_inf_sci", f32([1.5e-6, float("nan"), float("-inf"), 3.0])
    yield "only_nan", f32([float("nan"), float("nan")])
    yield "only_inf", f32([float("inf"), float("-inf")])
    yield "negative_nan", -f32([float("nan"), 1.0])
    yield "nan_wider_than_int_width", f32([[1, float("nan")], [float("-inf"), 2]])
    yield "scalar_fixed", f32(3.14159)
    yield "scalar_integral", f32(-7.0)
    yield "scalar_sci", f32(1.25e-9)
    yield "scalar_zero", f32(0.0)
    yield "scalar_negative_zero", f32(-0.0)
    yield "scalar_nan", f32(float("nan"))
    yield "scalar_inf", f32(float("-inf"))
    yield "single_element_1d", f32([0.1])
    yield "single_element_2d", f32([[2.0]])
    yield "column_3x1", normal((3, 1))
    yield "wrap_1d_100", normal((100,))
    yield "wrap_1d_sci_50", normal((50,), 1e-5)
    yield "wrap_2d_rows", normal((3, 30))
    yield "wrap_wide_sci_negative", f32(-np.abs(normal((20,), 1e12)))
    yield "threshold_1000_not_summarized", normal((1000,))
    yield "threshold_1001_summarized", normal((1001,))
    matrix = normal((40, 40))
    matrix[0, 20] = 1e-9  # in a printed row, but a hidden column
    yield "summarized_2d_40x40", matrix
    yield "summarized_3d_10x10x20", normal((10, 10, 20))
    yield "summarized_4d_short_dims", normal((2, 3, 4, 50))
    yield "summarized_dim_of_7", normal((7, 150))
    yield "summarized_integral", f32(rng.randint(-5, 6, (30, 40)))
    yield "summarized_hidden_ints_visible_fraction", summarized_hidden_fraction()
    yield "three_d_2x3x4", normal((2, 3, 4))
    yield "four_d_2x2x2x2", normal((2, 2, 2, 2))
    yield "five_d_2x1x2x1x2", normal((2, 1, 2, 1, 2))
    yield "deep_nesting_9d", normal((1, 1, 1, 1, 1, 1, 1, 2, 12))
    yield "rounding_ties_to_even", f32([0.03125, 0.09375, 0.15625, 1.00005, 2.5])
    yield "rounding_sci_ties", f32([1.03125e-3, 2.0, 1.5e3, 0.000244140625])
    yield "rounding_carry", f32([9.99995, 0.99999, 99.99996])
    yield "subnormal", f32([1e-45, 1.0])
    yield "float32_max", f32([3.4028235e38, -1.0])
    yield "integral_negative_wide", f32([-1e7, 5, 3])
    yield "empty_1d", np.zeros((0,), dtype=np.float32)
    yield "empty_2d", np.zeros((0, 3), dtype=np.float32)
    yield "empty_3d", np.zeros((2, 0, 4), dtype=np.float32)
    yield "empty_size_wraps", np.zeros((0, 10**9, 10**9) + (1,) * 15, dtype=np.float32)
    # The innermost indent (7 + 79) passes the 80-column line width.
    yield "indent_past_line_width_80d", torch.tensor([1.5, 2.5]).reshape((1,) * 79 + (2,))


def summarized_hidden_fraction():
    # Every printed element is integral, from 1 to 97; a hidden one is not. torch prints in int
    # mode ("1.,"); counting the hidden element would switch it to fixed notation ("1.0000,").
    values = (np.arange(2000) % 97 + 1).astype(np.float32).reshape(40, 50)
    values[20, 25] = 0.5
    return values


def float_hex(value):
    return format(int(np.float32(value).view(np.uint32)), "08x")


def read_cases(path):
    """Yields (name, array) for each block of a case file."""
    name = shape = None
    with open(path) as f:
        for line in f:
            key, _, rest = line.rstrip("\n").partition(" ")
            if key == "case":
                name = rest
            elif key == "shape":
                shape = tuple(int(d) for d in rest.split())
            elif key == "values":
                bits = np.array([int(h, 16) for h in rest.split()], dtype=np.uint32)
                values = torch.from_numpy(bits.view(np.float32))
                yield name, values.reshape(shape)


def write_case(out, name, array):
    """Writes one case; `array` is a numpy array or (beyond numpy's 32 dims) a torch tensor."""
    if isinstance(array, torch.Tensor):
        tensor = array.to(torch.float32).contiguous()
    else:
        # np.array, unlike np.ascontiguousarray, keeps 0-d arrays 0-d.
        tensor = torch.from_numpy(np.array(array, dtype=np.float32, order="C"))
    lines = str(tensor).split("\n")
    out.write("case %s\n" % name)
    out.write("shape%s\n" % "".join(" %d" % d for d in tensor.shape))
    out.write("values%s\n" % "".join(" " + float_hex(v) for v in tensor.reshape(-1).numpy()))
    out.write("expected %d\n" % len(lines))
    for line in lines:
        out.write(line + "\n")


def main():
    if not torch.__version__.startswith(EXPECTED_TORCH):
        sys.exit(f"expected torch {EXPECTED_TORCH}.x, found {torch.__version__}")
    torch.set_printoptions(profile="default")
    out = sys.stdout
    if len(sys.argv) == 3 and sys.argv[1] == "--from":
        for name, array in read_cases(sys.argv[2]):
            write_case(out, name, array)
        return
    if len(sys.argv) != 1:
        sys.exit("usage: make_format_cases.py [--from CASE_FILE]")
    out.write("# Generated by make_format_cases.py with torch %s; do not edit.\n" % torch.__version__)
    for name, array in cases():
        write_case(out, name, array)


if __name__ == "__main__":
    main()
