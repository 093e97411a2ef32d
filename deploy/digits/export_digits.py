#!/usr/bin/python3
"""Exports scikit-learn's bundled handwritten digits as .npy files for `gradctl train`.

    /usr/bin/python3 deploy/digits/export_digits.py --out DIR

writes DIR/train_inputs.npy and DIR/test_inputs.npy ([N, 1, 8, 8] float32, pixel / 16, so in
[0, 1]) and DIR/train_labels.npy and DIR/test_labels.npy ([N] int64 class indices 0..9). The
1797 images ship with python3-sklearn, so nothing is downloaded. The split is stratified and
fixed (RANDOM_STATE), so every run, here or in PyTorch, sees the same 1437 training and 360
test images in the same order.
"""

import argparse
import pathlib
import sys

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

TEST_SIZE = 0.2
RANDOM_STATE = 0
# The pixels of load_digits are counts of set cells in a 4x4 block: integers 0..16.
PIXEL_MAX = 16.0


def load_split():
    """Returns (train_inputs, train_labels, test_inputs, test_labels) as the files hold them."""
    digits = load_digits()
    images = (digits.images.astype(np.float32) / np.float32(PIXEL_MAX))[:, np.newaxis, :, :]
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=TEST_SIZE, stratify=labels, random_state=RANDOM_STATE)
    return (np.ascontiguousarray(train_x), np.ascontiguousarray(train_y),
            np.ascontiguousarray(test_x), np.ascontiguousarray(test_y))


def write_split(out):
    """Writes the four files into out (created if missing); returns their paths by name."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_x, train_y, test_x, test_y = load_split()
    paths = {}
    for name, array in (("train_inputs", train_x), ("train_labels", train_y),
                        ("test_inputs", test_x), ("test_labels", test_y)):
        paths[name] = out / f"{name}.npy"
        np.save(paths[name], array)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write the .npy files into")
    args = parser.parse_args(argv)
    paths = write_split(args.out)
    for name, path in paths.items():
        array = np.load(path)
        print(f"{path}: {array.dtype} {list(array.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
