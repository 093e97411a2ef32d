"""Builds the gradservice package; the metadata is in pyproject.toml.

The gRPC modules (gradservice/_proto/) are not in the repository: when they are missing they
are generated from ../proto (or $GRAD_PROTO_ROOT) with generate_proto.py before setuptools
looks for the packages, so that `pip install --no-build-isolation ./python` works from a clean
tree.
"""

import os
import pathlib
import sys

from setuptools import setup

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import generate_proto  # noqa: E402  pylint: disable=wrong-import-position

PROTO_OUT = HERE / "gradservice" / "_proto"
if not all((PROTO_OUT / name).is_file() for name in generate_proto.MODULES):
    generate_proto.generate(os.environ.get("GRAD_PROTO_ROOT", generate_proto.DEFAULT_PROTO_ROOT),
                            PROTO_OUT)

setup(packages=["gradservice", "gradservice._proto"])
