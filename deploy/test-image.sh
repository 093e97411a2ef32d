#!/usr/bin/env bash
# Builds the container image from the top-level Dockerfile and checks it for real, without a
# Docker engine (buildah, as root, vfs storage, chroot isolation):
#   1. base:  a local debian:bookworm-slim; where there is none, one is made with debootstrap
#             from the Debian mirror the host's apt uses (GRAD_DEBIAN_MIRROR overrides), and
#             kept for the next run;
#   2. build: `buildah bud` of the Dockerfile, tagged gradserver:test (Docker format, which
#             keeps the HEALTHCHECK); the image's user, entrypoint, port and health check are
#             checked against what the Dockerfile promises;
#   3. start: gradserver from the image on a free loopback port, as the image's user (checked:
#             uid 10001, not root);
#   4. check: the host's gradctl waits for SERVING, runs `gradctl demo all` (3 demos matching
#             PyTorch) and `gradctl grad` on a PyTorch fixture, whose .npy results are compared
#             with PyTorch's under the tolerance of tests/tolerance.h; then the image's own
#             gradctl runs the image's HEALTHCHECK command and `gradctl info` against the server;
#   5. stop:  SIGTERM, and the server must drain and exit 0.
# It prints the image size and the seconds each step took. Working containers are removed on
# exit, also after a failure; the base image and the last gradserver:test stay.
#
#   bash deploy/test-image.sh [BUILD_DIR]      (default: build/; the host's gradctl comes from it)
#
# Needs buildah and debootstrap (deploy/install-deps.sh), /usr/bin/python3 with numpy, and
# BUILD_DIR/client/gradctl. With Docker the base image is simply pulled: `docker build -t
# gradserver .` (README, "Docker").
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build}"
gradctl="$build/client/gradctl"
base_image="docker.io/library/debian:bookworm-slim"
image="localhost/gradserver:test"
fixture="${GRAD_IMAGE_FIXTURE:-chain4_mixed_mse}"
[[ -x "$gradctl" ]] || { echo "test-image: $gradctl is missing; build first" >&2; exit 1; }
[[ -f "$root/tests/fixtures/$fixture/case.txt" ]] ||
  { echo "test-image: no fixture tests/fixtures/$fixture" >&2; exit 1; }
[[ "$(id -u)" -eq 0 ]] || { echo "test-image: run as root (buildah with chroot isolation)" >&2; exit 1; }

# One storage driver for every buildah call: vfs works everywhere (also inside a container),
# overlay does not.
storage=(--storage-driver vfs)
bh() { buildah "${storage[@]}" "$@"; }

work="$(mktemp -d)"
containers=()  # working containers of this run, removed on exit
server_pid=""      # `buildah run gradserver`
gradserver_pid=""  # gradserver itself
cleanup() {
  if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
    # buildah answers SIGTERM by killing gradserver with SIGKILL; let it drain instead.
    if [[ -n "$gradserver_pid" ]]; then
      kill -TERM "$gradserver_pid" 2>/dev/null || true
    else
      kill -TERM "$server_pid" 2>/dev/null || true
    fi
    wait "$server_pid" 2>/dev/null || true
  fi
  for ctr in "${containers[@]}"; do
    bh umount "$ctr" >/dev/null 2>&1 || true
    bh rm "$ctr" >/dev/null 2>&1 || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Containers of runs that died without cleaning up are named test-image-<pid>-...
for name in $(bh containers --format '{{.ContainerName}}' | grep '^test-image-[0-9]*-' || true); do
  pid="${name#test-image-}"
  pid="${pid%%-*}"
  if ! kill -0 "$pid" 2>/dev/null; then
    bh rm "$name" >/dev/null || true
  fi
done

step_names=()
step_seconds=()
step_start=0
begin_step() {
  echo "== $1"
  step_names+=("$1")
  step_start=$(date +%s.%N)
}
end_step() {
  step_seconds+=("$(/usr/bin/python3 -c "print(f'{$(date +%s.%N) - $step_start:.1f}')")")
}

# The Debian archive the host installs from, from its deb822 or one-line apt sources.
apt_uri() {  # apt_uri SUFFIX: the first URI ending in /SUFFIX
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
      2>/dev/null |
    sed -n -e 's/^URIs:[[:space:]]*//p' -e 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?//p' |
    tr ' ' '\n' | grep -m 1 "^[a-z]*://.*/$1/\?$" | sed 's:/$::' || true
}

begin_step "base image $base_image"
if bh inspect --type image "$base_image" >/dev/null 2>&1; then
  echo "present"
else
  mirror="${GRAD_DEBIAN_MIRROR:-$(apt_uri debian)}"
  mirror="${mirror:-http://deb.debian.org/debian}"
  security="$(apt_uri debian-security)"
  security="${security:-http://deb.debian.org/debian-security}"
  echo "none; making one with debootstrap from $mirror"
  ctr="$(bh from --name "test-image-$$-base" scratch)"
  containers+=("$ctr")
  rootfs="$(bh mount "$ctr")"
  [[ -d "$rootfs" && "$rootfs" != / ]] || { echo "test-image: cannot mount $ctr" >&2; exit 1; }
  # An https archive needs the CA certificates inside the image too, for the Dockerfile's apt.
  include=()
  [[ "$mirror$security" == *https://* ]] && include=(--include=ca-certificates)
  debootstrap --variant=minbase "${include[@]}" \
    --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
    bookworm "$rootfs" "$mirror" > "$work/debootstrap.log" 2>&1 ||
    { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
  # What the official slim image does: the same apt sources, no documentation, manuals or
  # translations installed, no downloaded packages or package lists kept.
  rm -f "$rootfs/etc/apt/sources.list"
  cat > "$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  cat > "$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
  cat > "$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  echo 'Acquire::Languages "none";' > "$rootfs/etc/apt/apt.conf.d/docker-no-languages"
  find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  rm -rf "$rootfs"/usr/share/{man,info,groff,lintian,linda,locale}/* \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/var/log/*.log "$rootfs/etc/resolv.conf" "$rootfs/etc/hostname"
  bh umount "$ctr" >/dev/null
  bh config --cmd bash "$ctr"
  bh commit --quiet --rm "$ctr" "$base_image" >/dev/null
  containers=()
fi
end_step

begin_step "build $image from Dockerfile"
old_image="$(bh images --quiet --no-trunc "$image" 2>/dev/null || true)"
bh bud --isolation chroot --format docker --pull=false --quiet \
  --iidfile "$work/iid" -t "$image" -f "$root/Dockerfile" "$root" > "$work/bud.log" 2>&1 ||
  { tail -n 60 "$work/bud.log" >&2; exit 1; }
image_id="$(cat "$work/iid")"
image_id="${image_id#sha256:}"
if [[ -n "$old_image" && "${old_image#sha256:}" != "$image_id" ]]; then
  bh rmi "$old_image" >/dev/null 2>&1 || true  # the previous run's; kept if still in use
fi
expect_config() {  # expect_config WHAT GO_TEMPLATE EXPECTED
  local actual
  actual="$(bh inspect --type image --format "$2" "$image_id")"
  [[ "$actual" == "$3" ]] ||
    { echo "test-image: image $1 is '$actual', expected '$3'" >&2; exit 1; }
}
expect_config user '{{.Docker.Config.User}}' '10001:10001'
expect_config entrypoint '{{.Docker.Config.Entrypoint}}' '[gradserver]'
expect_config cmd '{{.Docker.Config.Cmd}}' '[--address=0.0.0.0:50051]'
expect_config 'exposed ports' '{{range $p, $_ := .Docker.Config.ExposedPorts}}{{$p}} {{end}}' \
  '50051/tcp '
expect_config 'stop signal' '{{.Docker.Config.StopSignal}}' 'SIGTERM'
healthcheck="$(bh inspect --type image --format \
  '{{if .Docker.Config.Healthcheck}}{{range .Docker.Config.Healthcheck.Test}}{{.}} {{end}}{{end}}' \
  "$image_id")"
healthcheck="${healthcheck% }"
[[ "$healthcheck" == "CMD gradctl health "* ]] ||
  { echo "test-image: image health check is '$healthcheck'" >&2; exit 1; }
end_step

begin_step "start gradserver from the image"
server_ctr="$(bh from --name "test-image-$$-server" "$image_id")"
containers+=("$server_ctr")
# Every shared library the binaries need is in the image.
bh run --isolation chroot "$server_ctr" -- ldd /usr/local/bin/gradserver /usr/local/bin/gradctl \
  > "$work/ldd.log"
! grep 'not found' "$work/ldd.log" ||
  { echo "test-image: the image lacks shared libraries" >&2; exit 1; }
# buildah run runs the command as the image's USER; port 0 picks a free port.
buildah "${storage[@]}" run --isolation chroot "$server_ctr" -- gradserver --address=127.0.0.1:0 \
  > "$work/server.log" 2>&1 &
server_pid=$!
address=""
for _ in $(seq 600); do
  address="$(sed -n 's/^gradserver listening on //p' "$work/server.log" | head -n 1)"
  [[ -n "$address" ]] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
  sleep 0.05
done
[[ -n "$address" ]] ||
  { echo "test-image: gradserver did not start" >&2; cat "$work/server.log" >&2; exit 1; }
# The gradserver process among the descendants of `buildah run`.
generation=("$server_pid")
while [[ ${#generation[@]} -gt 0 && -z "$gradserver_pid" ]]; do
  children=()
  for pid in "${generation[@]}"; do
    for child in $(cat /proc/"$pid"/task/*/children 2>/dev/null || true); do
      [[ "$(cat "/proc/$child/comm" 2>/dev/null || true)" == gradserver ]] && gradserver_pid="$child"
      children+=("$child")
    done
  done
  generation=("${children[@]+"${children[@]}"}")
done
[[ -n "$gradserver_pid" ]] || { echo "test-image: no gradserver process found" >&2; exit 1; }
server_uid="$(awk '/^Uid:/ {print $2}' "/proc/$gradserver_pid/status")"
[[ "$server_uid" == 10001 ]] ||
  { echo "test-image: gradserver runs as uid $server_uid, expected 10001" >&2; exit 1; }
echo "gradserver pid $gradserver_pid, uid $server_uid, listening on $address"
end_step

begin_step "check the server from the host and from the image"
for _ in $(seq 100); do
  "$gradctl" health --server="$address" --timeout=2s > /dev/null 2>&1 && break
  sleep 0.1
done
"$gradctl" health --server="$address"

"$gradctl" demo all --server="$address" > "$work/demo.log" 2>&1 ||
  { cat "$work/demo.log" >&2; exit 1; }
matches="$(grep -c '^Matches PyTorch' "$work/demo.log" || true)"
[[ "$matches" == 3 ]] ||
  { cat "$work/demo.log" >&2; echo "test-image: $matches of 3 demos matched PyTorch" >&2; exit 1; }
echo "gradctl demo all: 3 demos match PyTorch"

# The fixture's case.txt (grammar: tests/torch/fixture.h) as gradctl grad's NET.json and flags.
case_dir="$root/tests/fixtures/$fixture"
mapfile -t grad_flags < <(/usr/bin/python3 - "$case_dir" "$work/net.json" <<'EOF'
import json, sys
case_dir, net_path = sys.argv[1], sys.argv[2]
layers, flags = [], []
activations = {"relu": "RELU", "leaky_relu": "LEAKY_RELU", "tanh": "TANH", "sigmoid": "SIGMOID",
               "elu": "ELU", "gelu": "GELU", "gelu_tanh": "GELU_TANH"}
for line in open(f"{case_dir}/case.txt"):
    words = line.split("#", 1)[0].split()
    if not words:
        continue
    keys = dict(word.split("=", 1) for word in words[1:] if "=" in word)
    ints = lambda key: [int(v) for v in keys[key].split(",")]
    if words[0] == "layer" and words[2] == "conv2d":
        layers.append({"name": words[1], "conv2d": {
            "inChannels": int(keys["in_channels"]), "outChannels": int(keys["out_channels"]),
            "kernelSize": ints("kernel"), "stride": ints("stride"), "padding": ints("padding"),
            "dilation": ints("dilation"), "groups": int(keys["groups"]),
            "bias": keys["bias"] == "1"}})
    elif words[0] == "layer":
        activation = {"kind": activations[words[2]]}
        for key in ("negative_slope", "alpha"):
            if key in keys:
                activation["alpha"] = float(keys[key])
        layers.append({"name": words[1], "activation": activation})
    elif words[0] == "objective":
        flags.append({"mse": f"--target={case_dir}/target.npy", "sum": "--objective=sum",
                      "grad_output": f"--grad_output={case_dir}/grad_output.npy"}[words[1]])
    elif words[0] == "input_grad" and words[1] == "0":
        flags.append("--no_input_grad")
    elif words[0] == "param_grads":
        flags.append("--param_grads=" + ",".join(words[1:]))
json.dump({"layers": layers}, open(net_path, "w"))
print("\n".join(flags))
EOF
)
"$gradctl" grad --server="$address" --net="$work/net.json" --input="$case_dir/input.npy" \
  --params="$case_dir/params" --out="$work/grad" "${grad_flags[@]}" > "$work/grad.json"
# Every tensor PyTorch computed, against gradctl's: tests/tolerance.h's check, restated.
/usr/bin/python3 - "$case_dir/expected" "$work/grad" "$work/grad.json" <<'EOF'
import json, os, sys
import numpy as np
RELATIVE_TOLERANCE = 1e-4  # tests/tolerance.h, kRelativeTolerance
expected_dir, actual_dir, reply = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
names = sorted(os.listdir(expected_dir))
assert names, f"no expected tensors in {expected_dir}"
for name in names:
    expected = np.load(os.path.join(expected_dir, name))
    if name == "loss.npy":
        actual = np.array([reply["loss"]], dtype=np.float32)
    else:
        actual = np.load(os.path.join(actual_dir, name))
    assert actual.dtype == np.float32 and actual.shape == expected.shape, \
        f"{name}: {actual.dtype} {actual.shape}, expected float32 {expected.shape}"
    nonfinite = ~np.isfinite(expected)  # must match exactly in kind, NaN where NaN
    assert np.array_equal(actual[nonfinite], expected[nonfinite], equal_nan=True), \
        f"{name}: non-finite values differ"
    scale = max(1.0, float(np.abs(expected[~nonfinite]).max(initial=0.0)))
    worst = float(np.abs(actual[~nonfinite].astype(np.float64) - expected[~nonfinite]).max(initial=0.0))
    assert worst <= RELATIVE_TOLERANCE * scale, \
        f"{name}: max |actual - expected| = {worst:.3g} > {RELATIVE_TOLERANCE} * {scale:.3g}"
case = os.path.basename(os.path.dirname(expected_dir))
print(f"gradctl grad on {case}: {', '.join(n[:-len('.npy')] for n in names)} match PyTorch "
      f"within {RELATIVE_TOLERANCE} * max(1, max |expected|)")
EOF

# The image's own gradctl, run in a second container from the image: its HEALTHCHECK command
# (pointed at this server's port) and `info`.
client_ctr="$(bh from --name "test-image-$$-client" "$image_id")"
containers+=("$client_ctr")
read -r -a health_cmd <<< "${healthcheck#CMD }"
bh run --isolation chroot "$client_ctr" -- "${health_cmd[@]}" --server="$address"
bh run --isolation chroot "$client_ctr" -- gradctl info --server="$address" > "$work/info.log"
grep -q . "$work/info.log" || { echo "test-image: gradctl info printed nothing" >&2; exit 1; }
echo "the image's gradctl: health SERVING, info answered"
end_step

begin_step "SIGTERM: gradserver drains and exits 0"
kill -TERM "$gradserver_pid"
server_exit=0
wait "$server_pid" || server_exit=$?
server_pid=""
[[ "$server_exit" -eq 0 ]] ||
  { cat "$work/server.log" >&2; echo "test-image: gradserver exited with $server_exit" >&2; exit 1; }
echo "exit 0; the server's log:"
sed 's/^/  /' "$work/server.log"
end_step

echo
echo "== summary"
echo "image $image ($image_id): $(bh images --format '{{.Size}}' "$image_id")"
for i in "${!step_names[@]}"; do
  printf '%8ss  %s\n' "${step_seconds[$i]}" "${step_names[$i]}"
done
