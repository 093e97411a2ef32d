# gradserver and gradctl on Debian bookworm.
#
#   docker build -t gradserver .
#   docker run -p 50051:50051 gradserver [--flag=value ...]    (flags: README, "Running the server")
#
# The build stage installs the compile dependencies with the project's own script and builds
# only the two binaries; the runtime stage holds them, the shared libraries they load and nothing
# else, and runs them as the unprivileged user gradserver (uid 10001). deploy/test-image.sh
# builds this file with buildah and checks the result end to end.

FROM debian:bookworm-slim AS build
COPY deploy/install-deps.sh /src/deploy/install-deps.sh
RUN bash /src/deploy/install-deps.sh --build && rm -rf /var/lib/apt/lists/*
COPY . /src
RUN cmake -S /src -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGRAD_BUILD_BENCHMARKS=OFF \
 && cmake --build /build --target gradserver gradctl \
 && strip /build/server/gradserver /build/client/gradctl

FROM debian:bookworm-slim
# The runtime halves of the -dev packages deploy/install-deps.sh builds with: oneDNN 2.6 (which
# brings libgomp1 and an OpenCL loader), gRPC++ 1.51 (with libgrpc29), protobuf 3.21, abseil,
# and cpp-httplib 0.11 for --metrics_address (Debian builds it as a shared library; it brings
# libssl3, zlib and brotli).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libdnnl2 libgomp1 libgrpc++1.51 libgrpc29 libprotobuf32 libabsl20220623 \
      libcpp-httplib0.11 \
 && apt-get clean && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 gradserver \
 && useradd --system --uid 10001 --gid gradserver --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin gradserver
COPY --from=build /build/server/gradserver /build/client/gradctl /usr/local/bin/
USER 10001:10001
EXPOSE 50051
# SIGTERM makes gradserver report NOT_SERVING, refuse new calls, let in-flight ones finish
# (--shutdown_grace_seconds, default 30) and exit 0; give it that long before a SIGKILL
# (docker stop -t 35).
STOPSIGNAL SIGTERM
# Asks the default port in plaintext; for another --address, or TLS, override it (docker run
# --health-cmd, a Compose healthcheck).
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
  CMD ["gradctl", "health", "--server=localhost:50051", "--timeout=3s"]
ENTRYPOINT ["gradserver"]
CMD ["--address=0.0.0.0:50051"]
