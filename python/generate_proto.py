"""Generates gradservice/_proto/ from ../proto/grad/v1/gradient_service.proto.

Runs Debian's protoc with grpc_python_plugin and rewrites the generated modules' absolute
import of each other ("from grad.v1 import gradient_service_pb2") into a relative one, so that
the package works wherever it is installed. Used by the CMake build (python/CMakeLists.txt) and
by setup.py when the modules are missing.

    /usr/bin/python3 generate_proto.py [--proto_root DIR] [--out DIR]
"""

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
PROTO_FILE = "grad/v1/gradient_service.proto"
DEFAULT_PROTO_ROOT = HERE.parent / "proto"
DEFAULT_OUT = HERE / "gradservice" / "_proto"
PROTOC = os.environ.get("GRAD_PROTOC", "/usr/bin/protoc")
GRPC_PYTHON_PLUGIN = os.environ.get("GRAD_GRPC_PYTHON_PLUGIN", "/usr/bin/grpc_python_plugin")
MODULES = ("gradient_service_pb2.py", "gradient_service_pb2_grpc.py")


def generate(proto_root=DEFAULT_PROTO_ROOT, out=DEFAULT_OUT):
    """Writes out/__init__.py and the two modules of MODULES; raises on any failure."""
    proto_root = pathlib.Path(proto_root)
    out = pathlib.Path(out)
    source = proto_root / PROTO_FILE
    if not source.is_file():
        raise FileNotFoundError(f"{source}: the wire contract is missing")
    for tool in (PROTOC, GRPC_PYTHON_PLUGIN):
        if not os.access(tool, os.X_OK):
            raise FileNotFoundError(f"{tool} is not an executable (Debian packages "
                                    "protobuf-compiler and protobuf-compiler-grpc)")
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([PROTOC, f"--proto_path={proto_root}", f"--python_out={scratch}",
                        f"--grpc_out={scratch}",
                        f"--plugin=protoc-gen-grpc={GRPC_PYTHON_PLUGIN}", str(source)],
                       check=True)
        generated = pathlib.Path(scratch) / pathlib.Path(PROTO_FILE).parent
        # Written next to the final place and renamed, so that a reader never sees half a file.
        out.mkdir(parents=True, exist_ok=True)
        for name in MODULES:
            text = (generated / name).read_text(encoding="utf-8")
            text = re.sub(r"^from grad\.v1 import ", "from . import ", text, flags=re.MULTILINE)
            partial = out / (name + ".tmp")
            partial.write_text(text, encoding="utf-8")
            os.replace(partial, out / name)
        init = out / "__init__.py"
        init.write_text('"""Generated from proto/grad/v1/gradient_service.proto; not edited."""\n',
                        encoding="utf-8")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proto_root", default=str(DEFAULT_PROTO_ROOT))
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    try:
        generate(args.proto_root, args.out)
    except (OSError, subprocess.CalledProcessError) as error:
        print(f"generate_proto.py: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
