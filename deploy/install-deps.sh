#!/usr/bin/env bash
# Installs everything needed to build, test and benchmark the project on Debian bookworm.
# Used by the README, by .ci/run and by the Dockerfile, so they cannot disagree.
#
#   deploy/install-deps.sh            build + test dependencies (including PyTorch for fixtures,
#                                     and buildah + debootstrap for deploy/test-image.sh)
#   deploy/install-deps.sh --build    only what compiling needs (the container's build stage)
set -euo pipefail

build_packages=(
  build-essential cmake ninja-build pkg-config git ca-certificates
  libdnnl-dev ocl-icd-opencl-dev opencl-c-headers libabsl-dev
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libgtest-dev libgmock-dev libbenchmark-dev
  libcpp-httplib-dev  # gradserver's Prometheus endpoint (--metrics_address)
)
test_packages=(
  python3 python3-numpy python3-torch
  python3-yaml openssl  # tests/deploy/manifest_test.py: reads the manifests, makes a test certificate
  python3-prometheus-client  # tests/service/metrics_endpoint_test.py: parses the /metrics text
  # python/: the Python client (gradservice) and its pytest suite, pip-installed into a venv by
  # a test; the handwritten digits training demo (scikit-learn's bundled data set, matplotlib)
  python3-grpcio python3-protobuf python3-pytest python3-venv python3-pip python3-setuptools
  python3-sklearn python3-matplotlib
  buildah debootstrap   # deploy/test-image.sh: builds and runs the image without a Docker engine
  # tests/fuzz: libFuzzer and the sanitizers' runtimes come with clang, and the engine's
  # OpenMP needs clang's own runtime (libomp) for the clang build to configure
  clang-14 libfuzzer-14-dev libclang-rt-14-dev libomp-14-dev
)

packages=("${build_packages[@]}")
if [[ "${1:-}" != "--build" ]]; then
  packages+=("${test_packages[@]}")
fi

if [[ "$(id -u)" -ne 0 ]]; then
  SUDO=sudo
else
  SUDO=
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends "${packages[@]}"
