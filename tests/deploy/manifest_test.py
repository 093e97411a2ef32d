#!/usr/bin/env python3
"""Checks deploy/k8s/*.yaml and deploy/docker-compose.yml against gradserver itself.

Not only that the manifests agree with each other (selectors, ports, HPA and PDB), but that they
agree with the binary: every flag they pass is one `gradserver --helpfull` lists, and gradserver
started with the Deployment's and the Compose file's own arguments (rewritten only for this
host: loopback addresses and free ports, secret mounts replaced by files made here) starts,
answers SERVING on the plaintext health port through `gradctl health`, serves Prometheus
metrics where the pod annotations say, enforces the TLS and the token the Deployment
configures, and after SIGTERM exits 0 within the time the manifests give it.

    /usr/bin/python3 tests/deploy/manifest_test.py --gradserver=BUILD/server/gradserver \\
        --gradctl=BUILD/client/gradctl [--root=REPO] [unittest arguments]

The paths may also come from the environment: GRADSERVER, GRADCTL, GRAD_SOURCE_DIR. Needs
PyYAML (python3-yaml) and openssl; no network, no cluster, no Docker.
"""

import argparse
import glob
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.request

import yaml

# After the drain, gradserver keeps its connections 0.5 s and closes the rest within 1 s more
# (server/server.h, Server::Shutdown).
CONNECTION_CLOSING_SECONDS = 1.5
# On top of that: process exit, signal delivery and scheduling on a busy machine. Every "does it
# stop in time" bound below adds this margin once.
EXIT_MARGIN_SECONDS = 2.0

PATHS = argparse.Namespace(gradserver=None, gradctl=None, root=None)

EXPECTED_API_VERSIONS = {
    "Deployment": "apps/v1",
    "Service": "v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "PodDisruptionBudget": "policy/v1",
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
}
REQUIRED_OBJECTS = [
    ("Deployment", "gradserver"),
    ("Service", "gradserver-headless"),
    ("Service", "gradserver"),
    ("HorizontalPodAutoscaler", "gradserver"),
    ("PodDisruptionBudget", "gradserver"),
]
CONTAINER = "gradserver"
# What gradserver's /metrics answers (server/metrics_http.h).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# ---------------------------------------------------------------------------------------------
# Loading and addressing fields


class Doc:
    """One YAML document, with where it came from for messages."""

    def __init__(self, path, body):
        self.path = path
        self.body = body
        self.kind = body.get("kind", "?") if isinstance(body, dict) else "?"
        name = body.get("metadata", {}).get("name") if isinstance(body, dict) else None
        self.name = name or "-"

    def where(self, field=""):
        rel = os.path.relpath(self.path, PATHS.root)
        return f"{rel}: {self.kind}/{self.name}" + (f": {field}" if field else "")

    def get(self, field, default=KeyError):
        """The value at a dotted path ("spec.template.spec"); fails naming it when missing."""
        value = self.body
        for part in field.split("."):
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif default is KeyError:
                raise AssertionError(f"{self.where(field)} is missing")
            else:
                return default
        return value


def load_k8s():
    docs = []
    for path in sorted(glob.glob(os.path.join(PATHS.root, "deploy", "k8s", "*.yaml"))):
        with open(path, encoding="utf-8") as f:
            try:
                bodies = list(yaml.safe_load_all(f))
            except yaml.YAMLError as e:
                raise AssertionError(f"{os.path.relpath(path, PATHS.root)}: not YAML: {e}")
        for body in bodies:
            if body is None:
                continue
            if not isinstance(body, dict):
                raise AssertionError(f"{os.path.relpath(path, PATHS.root)}: a document is not "
                                     "a mapping")
            docs.append(Doc(path, body))
    return docs


def find(docs, kind, name):
    for doc in docs:
        if doc.kind == kind and doc.name == name:
            return doc
    raise AssertionError(f"deploy/k8s: no {kind}/{name} in any file")


def load_compose():
    path = os.path.join(PATHS.root, "deploy", "docker-compose.yml")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        body = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise AssertionError(f"deploy/docker-compose.yml: not YAML: {e}")
    return path, text, body


def container_of(deployment):
    containers = deployment.get("spec.template.spec.containers")
    for i, c in enumerate(containers):
        if c.get("name") == CONTAINER:
            return i, c
    raise AssertionError(f"{deployment.where('spec.template.spec.containers')}: "
                         f"no container named {CONTAINER}")


# ---------------------------------------------------------------------------------------------
# Values: flags, quantities, durations, addresses


def parse_flags(args, where):
    """[--name=value, ...] -> {name: value or None}; fails on a positional argument."""
    flags = {}
    for arg in args:
        if not isinstance(arg, str) or not arg.startswith("--"):
            raise AssertionError(f"{where}: {arg!r} is not a --flag (gradserver takes no "
                                 "positional arguments)")
        name, equals, value = arg[2:].partition("=")
        flags[name] = value if equals else None
    return flags


def split_host_port(value, where):
    host, sep, port = (value or "").rpartition(":")
    if not sep or not port.isdigit():
        raise AssertionError(f"{where}: {value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def seconds_flag(flags, name, where):
    if flags.get(name) is None:
        raise AssertionError(f"{where}: --{name} is not set; the drain time must be explicit")
    try:
        return float(flags[name])
    except ValueError:
        raise AssertionError(f"{where}: --{name}={flags[name]} is not a number of seconds")


def cpu_cores(quantity, where):
    text = str(quantity)
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        raise AssertionError(f"{where}: {quantity!r} is not a CPU quantity")


# What gradserver's memory budget does not count, beyond one request still arriving: the
# program, its libraries and threads, oneDNN's kernels, plans being compiled (README, "Memory").
UNBUDGETED_BYTES = 512 << 20


def check_memory_budget_fits(test, flags, limit_bytes, where):
    """--max_memory_mb is set, and it plus one max_message_mb request plus UNBUDGETED_BYTES fit
    the container's memory limit, so that the budget is reached before the kernel's OOM killer."""
    test.assertIsNotNone(flags.get("max_memory_mb"),
                         f"{where}: set --max_memory_mb (the default is a share of the machine's "
                         "or cgroup's memory, which may not be the container's limit)")
    limit_bytes = int(limit_bytes)
    budget = int(flags["max_memory_mb"]) << 20
    message = int(flags.get("max_message_mb") or 1024) << 20
    test.assertGreater(budget, 0, f"{where}: --max_memory_mb must be positive")
    test.assertLessEqual(budget + message + UNBUDGETED_BYTES, limit_bytes,
                         f"{where}: --max_memory_mb={budget >> 20} + --max_message_mb="
                         f"{message >> 20} + {UNBUDGETED_BYTES >> 20} MiB unbudgeted exceed the "
                         f"memory limit of {limit_bytes >> 20} MiB")


def memory_bytes(quantity, where):
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
             "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(quantity))
    if not m or (m.group(2) and m.group(2) not in units):
        raise AssertionError(f"{where}: {quantity!r} is not a memory quantity")
    return float(m.group(1)) * units.get(m.group(2), 1)


def compose_memory_bytes(value, where):
    """A Compose byte value ("2g", "512m", "1024k", "1073741824"): units are powers of 1024."""
    m = re.fullmatch(r"([0-9]+)([bkmg]?)", str(value).lower())
    if not m:
        raise AssertionError(f"{where}: {value!r} is not a byte value such as 2g or 512m")
    return int(m.group(1)) * {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[m.group(2)]


def compose_seconds(value, where):
    """A Compose duration ("25s", "1m30s", "500ms") in seconds."""
    text = str(value)
    parts = re.findall(r"([0-9.]+)(h|ms|m|s|us)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise AssertionError(f"{where}: {value!r} is not a duration such as 25s or 1m30s")
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


# ---------------------------------------------------------------------------------------------
# The binaries


_HELPFULL = None


def gradserver_flags():
    """{flag name: is boolean} from `gradserver --helpfull`."""
    global _HELPFULL
    if _HELPFULL is None:
        run = subprocess.run([PATHS.gradserver, "--helpfull"], capture_output=True, text=True,
                             timeout=30)
        text = run.stdout + run.stderr
        flags = {}
        blocks = re.split(r"\n(?=\s+--\w+ \()", text)
        for block in blocks:
            m = re.match(r"\s+--(\w+) \(", block)
            if m:
                default = re.search(r"default: ([^;\n]*);", block)
                flags[m.group(1)] = bool(default) and default.group(1) in ("true", "false")
        if "address" not in flags:
            raise AssertionError(f"`{PATHS.gradserver} --helpfull` lists no --address; "
                                 f"output:\n{text}")
        _HELPFULL = flags
    return _HELPFULL


def check_flags_accepted(testcase, flags, where):
    known = gradserver_flags()
    for name, value in flags.items():
        if name not in known and name.startswith("no") and value is None:
            testcase.assertTrue(known.get(name[2:], False),
                                f"{where}: --{name} is not a flag `gradserver --helpfull` lists")
            continue
        testcase.assertTrue(name in known,
                            f"{where}: --{name} is not a flag `gradserver --helpfull` lists "
                            f"(it lists: {', '.join(sorted(known))})")


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """gradserver in a child process, its stderr collected by a thread."""

    def __init__(self, args):
        self.args = args
        self.lines = []
        self.listening = threading.Event()
        self.proc = subprocess.Popen([PATHS.gradserver] + args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("gradserver listening on "):
                self.listening.set()

    def log(self):
        return "\n".join(self.lines[-40:])

    def wait_listening(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.listening.wait(0.05):
                return True
            if self.proc.poll() is not None:
                self.reader.join(timeout=2)
                return False
        return False

    def stop(self, timeout):
        """SIGTERM; returns (exit code or None if still running after timeout, seconds taken)."""
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        elapsed = time.monotonic() - start
        self.reader.join(timeout=2)
        if code is not None:
            self.proc.stderr.close()
        return code, elapsed

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            self.reader.join(timeout=2)
            self.proc.stderr.close()


def scrape_metrics(port, path):
    """(status, Content-Type, body) of GET http://127.0.0.1:PORT/PATH."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.status, response.headers.get("Content-Type"), response.read().decode()


def gradctl(*args, timeout=30):
    run = subprocess.run([PATHS.gradctl] + list(args), capture_output=True, text=True,
                         timeout=timeout)
    return run.returncode, (run.stdout + run.stderr).strip()


def make_secret_files(directory):
    """A throwaway self-signed certificate for localhost/127.0.0.1, its key and a token file;
    returns {secret key name: path}."""
    cert = os.path.join(directory, "cert.pem")
    key = os.path.join(directory, "key.pem")
    run = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", key, "-out", cert], capture_output=True, text=True)
    if run.returncode != 0:
        raise AssertionError(f"openssl req -x509 failed (is openssl installed? "
                             f"deploy/install-deps.sh):\n{run.stderr}")
    tokens = os.path.join(directory, "tokens")
    with open(tokens, "w", encoding="utf-8") as f:
        f.write("manifest-test-token-1\nmanifest-test-token-2\n")
    return {"tls.crt": cert, "tls.key": key, "ca.crt": cert, "tokens": tokens}


def secret_mounts(deployment, container):
    """{mountPath: {file name in the mount: secret key}} for the container's secret volumes."""
    volumes = {v.get("name"): v for v in deployment.get("spec.template.spec.volumes", [])}
    mounts = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount.get("name"), {})
        if "secret" not in volume:
            continue
        items = volume["secret"].get("items")
        if not items:
            field = f"spec.template.spec.volumes[{volume['name']}].secret.items"
            raise AssertionError(f"{deployment.where(field)}: list the keys, so the test knows "
                                 "the files")
        mounts[mount["mountPath"].rstrip("/")] = {i["path"]: i["key"] for i in items}
    return mounts


# ---------------------------------------------------------------------------------------------
# Kubernetes


class KubernetesManifestTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.docs = load_k8s()
        cls.deployment = find(cls.docs, "Deployment", "gradserver")
        cls.index, cls.container = container_of(cls.deployment)
        cls.cfield = f"spec.template.spec.containers[{cls.index}]"
        cls.args = cls.container.get("args", [])
        cls.flags = parse_flags(cls.args, cls.deployment.where(cls.cfield + ".args"))
        cls.pod_labels = cls.deployment.get("spec.template.metadata.labels")
        cls.ports = {}  # containerPort name -> number
        for p in cls.container.get("ports", []):
            cls.ports[p.get("name")] = p.get("containerPort")

    def test_every_object_has_the_expected_kind_and_api_version(self):
        self.assertTrue(self.docs, "deploy/k8s: no manifests found")
        for doc in self.docs:
            self.assertIn(doc.kind, EXPECTED_API_VERSIONS,
                          f"{doc.where('kind')}: unexpected kind {doc.kind}")
            self.assertEqual(doc.body.get("apiVersion"), EXPECTED_API_VERSIONS[doc.kind],
                             doc.where("apiVersion"))
        for kind, name in REQUIRED_OBJECTS:
            find(self.docs, kind, name)
        names = [(d.kind, d.name) for d in self.docs if d.kind != "Kustomization"]
        self.assertEqual(len(names), len(set(names)),
                         f"deploy/k8s: an object is defined twice: {names}")

    def test_kustomization_lists_every_manifest(self):
        kustomization = os.path.join(PATHS.root, "deploy", "k8s", "kustomization.yaml")
        if not os.path.exists(kustomization):
            self.skipTest("no kustomization.yaml")
        doc = [d for d in self.docs if d.kind == "Kustomization"][0]
        listed = set(doc.get("resources"))
        files = {os.path.basename(p)
                 for p in glob.glob(os.path.join(PATHS.root, "deploy", "k8s", "*.yaml"))}
        files.discard("kustomization.yaml")
        self.assertEqual(listed, files, doc.where("resources") + ": must list each manifest once")

    def test_selectors_match_the_pod_labels(self):
        def covers(selector, where):
            self.assertTrue(selector, f"{where} is empty")
            for key, value in selector.items():
                self.assertEqual(self.pod_labels.get(key), value,
                                 f"{where}: {key}={value} does not match the pod labels "
                                 f"{self.pod_labels} of {self.deployment.where()}")

        d = self.deployment
        covers(d.get("spec.selector.matchLabels"), d.where("spec.selector.matchLabels"))
        for i, c in enumerate(d.get("spec.template.spec.topologySpreadConstraints", [])):
            field = f"spec.template.spec.topologySpreadConstraints[{i}].labelSelector.matchLabels"
            covers(c.get("labelSelector", {}).get("matchLabels"), d.where(field))
        for doc in self.docs:
            if doc.kind == "Service":
                covers(doc.get("spec.selector"), doc.where("spec.selector"))
            if doc.kind == "PodDisruptionBudget":
                covers(doc.get("spec.selector.matchLabels"), doc.where("spec.selector.matchLabels"))

    def test_ports_agree_with_the_address_flags(self):
        where = self.deployment.where(self.cfield)
        numbers = list(self.ports.values())
        self.assertEqual(len(numbers), len(set(numbers)), f"{where}.ports: a port is listed twice")
        self.assertIn("grpc", self.ports, f"{where}.ports: no port named grpc")
        host, port = split_host_port(self.flags.get("address"), f"{where}.args --address")
        self.assertEqual(port, self.ports["grpc"],
                         f"{where}.args: --address port {port} is not containerPort grpc "
                         f"({self.ports['grpc']})")
        self.assertIn(host, ("0.0.0.0", "[::]", "::"),
                      f"{where}.args: --address={self.flags['address']} must listen on all "
                      "interfaces for the pod IP to reach it")
        self.assertIn("health_address", self.flags, f"{where}.args: no --health_address")
        host, health_port = split_host_port(self.flags["health_address"],
                                            f"{where}.args --health_address")
        self.assertIn(health_port, numbers,
                      f"{where}.args: --health_address port {health_port} is no containerPort")
        self.assertIn(host, ("0.0.0.0", "[::]", "::"),
                      f"{where}.args: --health_address must listen on all interfaces: the "
                      "kubelet probes the pod IP")

        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = self.container.get(probe)
            if spec is None:
                self.assertNotEqual(probe, "readinessProbe", f"{where}.readinessProbe is missing")
                self.assertNotEqual(probe, "livenessProbe", f"{where}.livenessProbe is missing")
                continue
            self.assertIn("grpc", spec, f"{where}.{probe}: not a native grpc probe")
            self.assertEqual(spec["grpc"].get("port"), health_port,
                             f"{where}.{probe}.grpc.port must be the --health_address port "
                             f"{health_port}: the main port speaks TLS, which probes cannot")
            self.assertEqual(spec["grpc"].get("service", ""), "",
                             f"{where}.{probe}.grpc.service: gradserver reports the server's "
                             "status under the service name \"\"")

        for doc in self.docs:
            if doc.kind != "Service":
                continue
            for i, p in enumerate(doc.get("spec.ports")):
                field = f"spec.ports[{i}]"
                target = p.get("targetPort", p.get("port"))
                if isinstance(target, str):
                    self.assertIn(target, self.ports,
                                  f"{doc.where(field)}.targetPort: {target} names no containerPort")
                    target = self.ports[target]
                self.assertEqual(target, self.ports["grpc"],
                                 f"{doc.where(field)}.targetPort: must reach the grpc port")
                self.assertEqual(p.get("name"), "grpc", doc.where(field + ".name"))
                self.assertEqual(p.get("appProtocol"), "grpc", doc.where(field + ".appProtocol"))
        headless = find(self.docs, "Service", "gradserver-headless")
        self.assertEqual(headless.get("spec.clusterIP"), "None",
                         headless.where("spec.clusterIP") + ": a headless Service needs None")
        regular = find(self.docs, "Service", "gradserver")
        self.assertNotEqual(regular.get("spec.clusterIP", ""), "None",
                            regular.where("spec.clusterIP"))
        self.assertEqual(regular.get("spec.type", "ClusterIP"), "ClusterIP",
                         regular.where("spec.type"))

    def test_metrics_port_flag_and_annotations_agree(self):
        where = self.deployment.where(self.cfield)
        self.assertIn("metrics", self.ports, f"{where}.ports: no port named metrics")
        self.assertIn("metrics_address", self.flags, f"{where}.args: no --metrics_address")
        host, port = split_host_port(self.flags["metrics_address"],
                                     f"{where}.args --metrics_address")
        self.assertEqual(port, self.ports["metrics"],
                         f"{where}.args: --metrics_address port {port} is not containerPort "
                         f"metrics ({self.ports['metrics']})")
        self.assertIn(host, ("0.0.0.0", "[::]", "::"),
                      f"{where}.args: --metrics_address must listen on all interfaces: "
                      "Prometheus scrapes the pod IP")
        field = "spec.template.metadata.annotations"
        annotations = self.deployment.get(field, {})
        # Annotation values are strings; a YAML true or 9100 would be rejected by the API server.
        self.assertEqual(annotations.get("prometheus.io/scrape"), "true",
                         self.deployment.where(field + ".prometheus.io/scrape"))
        self.assertEqual(annotations.get("prometheus.io/port"), str(port),
                         self.deployment.where(field + ".prometheus.io/port") +
                         f": must be the --metrics_address port \"{port}\"")
        self.assertEqual(annotations.get("prometheus.io/path"), "/metrics",
                         self.deployment.where(field + ".prometheus.io/path"))
        for doc in self.docs:
            if doc.kind != "Service":
                continue
            for i, p in enumerate(doc.get("spec.ports")):
                self.assertNotIn(p.get("targetPort"), ("metrics", port),
                                 f"{doc.where(f'spec.ports[{i}]')}: scrapes go to each pod, not "
                                 "through a Service, which picks a pod per connection")

    def test_every_flag_is_one_gradserver_accepts(self):
        where = self.deployment.where(self.cfield + ".args")
        check_flags_accepted(self, self.flags, where)
        # What the rest of the manifests rely on.
        for name in ("address", "health_address", "metrics_address", "shutdown_grace_seconds",
                     "max_connection_age_seconds", "threads_per_request"):
            self.assertIsNotNone(self.flags.get(name), f"{where}: --{name} is not set")

    def test_resources_and_threads_fit_the_cpu_limit(self):
        where = self.deployment.where(self.cfield + ".resources")
        resources = self.container.get("resources", {})
        for part in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                self.assertIn(resource, resources.get(part, {}),
                              f"{where}.{part}.{resource} is missing")
        cpu_limit = cpu_cores(resources["limits"]["cpu"], f"{where}.limits.cpu")
        cpu_request = cpu_cores(resources["requests"]["cpu"], f"{where}.requests.cpu")
        self.assertLessEqual(cpu_request, cpu_limit, f"{where}: requests.cpu above limits.cpu")
        self.assertLessEqual(memory_bytes(resources["requests"]["memory"], where),
                             memory_bytes(resources["limits"]["memory"], where),
                             f"{where}: requests.memory above limits.memory")
        args = self.deployment.where(self.cfield + ".args")
        threads = int(self.flags.get("threads_per_request") or 0)
        concurrent = int(self.flags.get("max_concurrent_requests") or 0)
        self.assertGreaterEqual(threads, 1,
                                f"{args}: --threads_per_request must be set (0 counts the node's "
                                "cores, not the container's CPU limit)")
        self.assertGreaterEqual(concurrent, 1,
                                f"{args}: --max_concurrent_requests must be set (0 divides the "
                                "node's cores, not the container's CPU limit)")
        self.assertLessEqual(threads * concurrent, cpu_limit,
                             f"{args}: --threads_per_request={threads} x --max_concurrent_requests"
                             f"={concurrent} threads exceed limits.cpu={cpu_limit:g}")
        self.assertGreaterEqual(threads * concurrent, cpu_request,
                                f"{args}: {threads * concurrent} compute threads leave part of "
                                f"requests.cpu={cpu_request:g} unused")

    def test_memory_budget_fits_the_memory_limit(self):
        resources = self.container.get("resources", {})
        limit = memory_bytes(resources["limits"]["memory"],
                             self.deployment.where(self.cfield + ".resources.limits.memory"))
        check_memory_budget_fits(self, self.flags, limit,
                                 self.deployment.where(self.cfield + ".args"))

    def test_security_context(self):
        pod = self.deployment.get("spec.template.spec.securityContext", {})
        c = self.container.get("securityContext", {})
        where = self.deployment.where(self.cfield + ".securityContext")

        def effective(key):
            return c.get(key, pod.get(key))

        self.assertIs(effective("runAsNonRoot"), True, f"{where}.runAsNonRoot")
        self.assertEqual(effective("runAsUser"), 10001, f"{where}.runAsUser (the image's user)")
        self.assertIs(c.get("readOnlyRootFilesystem"), True, f"{where}.readOnlyRootFilesystem")
        self.assertIs(c.get("allowPrivilegeEscalation"), False, f"{where}.allowPrivilegeEscalation")
        self.assertNotEqual(c.get("privileged"), True, f"{where}.privileged")
        self.assertIn("ALL", c.get("capabilities", {}).get("drop", []),
                      f"{where}.capabilities.drop")
        self.assertFalse(c.get("capabilities", {}).get("add"), f"{where}.capabilities.add")
        seccomp = c.get("seccompProfile", pod.get("seccompProfile", {}))
        self.assertEqual(seccomp.get("type"), "RuntimeDefault", f"{where}.seccompProfile.type")

        volumes = {v.get("name"): v for v in self.deployment.get("spec.template.spec.volumes", [])}
        for i, mount in enumerate(self.container.get("volumeMounts", [])):
            field = self.deployment.where(f"{self.cfield}.volumeMounts[{i}]")
            self.assertIn(mount.get("name"), volumes, f"{field}.name: no such volume")
            if "secret" in volumes[mount["name"]]:
                self.assertIs(mount.get("readOnly"), True, f"{field}.readOnly: a secret mount")
                mode = volumes[mount["name"]]["secret"].get("defaultMode", 0o644)
                self.assertEqual(mode & 0o007, 0,
                                 f"{field}: secret volume {mount['name']} defaultMode "
                                 f"{mode:o} is readable by other users")

    def test_probes_give_liveness_more_slack_than_readiness(self):
        where = self.deployment.where(self.cfield)
        readiness = self.container.get("readinessProbe")
        liveness = self.container.get("livenessProbe")
        self.assertIsNotNone(readiness, f"{where}.readinessProbe is missing")
        self.assertIsNotNone(liveness, f"{where}.livenessProbe is missing")

        def window(probe):  # seconds of failed probes before it acts (Kubernetes' defaults)
            return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)

        self.assertGreater(window(liveness), window(readiness),
                           f"{where}.livenessProbe: periodSeconds x failureThreshold = "
                           f"{window(liveness)} s must exceed the readinessProbe's "
                           f"{window(readiness)} s, so a slow pod leaves rotation before it is "
                           "killed")
        self.assertGreaterEqual(liveness.get("timeoutSeconds", 1),
                                readiness.get("timeoutSeconds", 1),
                                f"{where}.livenessProbe.timeoutSeconds below the readinessProbe's")
        startup = self.container.get("startupProbe")
        if startup is None:
            self.assertGreater(liveness.get("initialDelaySeconds", 0), 0,
                               f"{where}.livenessProbe.initialDelaySeconds: without a startupProbe "
                               "liveness needs a delay")

    def test_termination_grace_covers_the_drain(self):
        spec = self.deployment.get("spec.template.spec")
        where = self.deployment.where("spec.template.spec.terminationGracePeriodSeconds")
        grace_period = spec.get("terminationGracePeriodSeconds")
        self.assertIsNotNone(grace_period,
                             f"{where} is missing (the default 30 s is then implicit)")
        shutdown = seconds_flag(self.flags, "shutdown_grace_seconds",
                                self.deployment.where(self.cfield + ".args"))
        pre_stop = self.pre_stop_seconds()
        needed = pre_stop + shutdown + CONNECTION_CLOSING_SECONDS + EXIT_MARGIN_SECONDS
        self.assertGreaterEqual(grace_period, needed,
                                f"{where}={grace_period} is less than preStop {pre_stop:g} s + "
                                f"--shutdown_grace_seconds {shutdown:g} s + closing "
                                f"{CONNECTION_CLOSING_SECONDS:g} s + margin "
                                f"{EXIT_MARGIN_SECONDS:g} s")

    def pre_stop_seconds(self):
        pre_stop = self.container.get("lifecycle", {}).get("preStop")
        if not pre_stop:
            return 0.0
        field = self.deployment.where(self.cfield + ".lifecycle.preStop")
        if "sleep" in pre_stop:
            return float(pre_stop["sleep"]["seconds"])
        command = pre_stop.get("exec", {}).get("command", [])
        self.assertTrue(command and os.path.basename(command[0]) == "sleep" and len(command) == 2,
                        f"{field}: only a sleep is understood here, got {pre_stop}")
        return float(command[1])

    def test_hpa_and_pdb_agree_with_the_deployment(self):
        hpa = find(self.docs, "HorizontalPodAutoscaler", "gradserver")
        target = hpa.get("spec.scaleTargetRef")
        self.assertEqual((target.get("apiVersion"), target.get("kind"), target.get("name")),
                         ("apps/v1", "Deployment", self.deployment.name),
                         hpa.where("spec.scaleTargetRef"))
        low, high = hpa.get("spec.minReplicas"), hpa.get("spec.maxReplicas")
        self.assertGreaterEqual(low, 2,
                                hpa.where("spec.minReplicas") + ": one replica is no service")
        self.assertGreaterEqual(high, low, hpa.where("spec.maxReplicas") + " below minReplicas")
        replicas = self.deployment.get("spec.replicas", 1)
        self.assertTrue(low <= replicas <= high,
                        f"{self.deployment.where('spec.replicas')}={replicas} is outside the HPA's "
                        f"[{low}, {high}]")
        metrics = hpa.get("spec.metrics")
        cpu = [m for m in metrics if m.get("type") == "Resource"
               and m.get("resource", {}).get("name") == "cpu"]
        self.assertTrue(cpu, hpa.where("spec.metrics") + ": no cpu Resource metric")
        utilisation = cpu[0]["resource"].get("target", {})
        self.assertEqual(utilisation.get("type"), "Utilization",
                         hpa.where("spec.metrics[cpu].target.type"))
        self.assertTrue(0 < utilisation.get("averageUtilization", 0) <= 100,
                        hpa.where("spec.metrics[cpu].target.averageUtilization"))
        self.assertGreater(hpa.get("spec.behavior.scaleDown.stabilizationWindowSeconds"), 0,
                           hpa.where("spec.behavior.scaleDown.stabilizationWindowSeconds"))

        pdb = find(self.docs, "PodDisruptionBudget", "gradserver")
        spec = pdb.get("spec")
        self.assertEqual(("minAvailable" in spec) + ("maxUnavailable" in spec), 1,
                         pdb.where("spec") + ": set exactly one of minAvailable, maxUnavailable")
        if "minAvailable" in spec:
            self.assertIsInstance(spec["minAvailable"], int, pdb.where("spec.minAvailable"))
            self.assertGreaterEqual(low, spec["minAvailable"] + 1,
                                    f"{hpa.where('spec.minReplicas')}={low} must exceed "
                                    f"{pdb.where('spec.minAvailable')}={spec['minAvailable']}, or "
                                    "no pod can ever be evicted")
        else:
            unavailable = spec["maxUnavailable"]
            self.assertIsInstance(unavailable, int, pdb.where("spec.maxUnavailable"))
            self.assertGreaterEqual(unavailable, 1,
                                    pdb.where("spec.maxUnavailable") + ": 0 blocks drains")
            self.assertGreaterEqual(low - unavailable, 2,
                                    f"{hpa.where('spec.minReplicas')}={low} with "
                                    f"{pdb.where('spec.maxUnavailable')}={unavailable} leaves "
                                    "fewer than two pods serving during a drain")

    def test_secrets_are_mounted_as_the_flags_expect_and_documented(self):
        mounts = secret_mounts(self.deployment, self.container)
        where = self.deployment.where(self.cfield + ".args")
        for flag in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"):
            value = self.flags.get(flag)
            if value is None:
                continue
            directory, name = os.path.split(value)
            self.assertIn(directory, mounts, f"{where}: --{flag}={value} is not in a secret mount "
                                             f"({', '.join(mounts) or 'none'})")
            self.assertIn(name, mounts[directory],
                          f"{where}: --{flag}={value}: the secret volume's items give no {name}")
        for flag in ("tls_cert", "tls_key", "auth_token_file"):
            self.assertIn(flag, self.flags, f"{where}: --{flag} is not set")
        with open(os.path.join(PATHS.root, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        volumes = self.deployment.get("spec.template.spec.volumes")
        for volume in volumes:
            secret = volume.get("secret")
            if not secret:
                continue
            name = secret["secretName"]
            where = self.deployment.where("spec.template.spec.volumes")
            self.assertTrue(re.search(rf"kubectl create secret \w+ {re.escape(name)}\b", readme),
                            f"README.md: no `kubectl create secret ... {name}` for the Secret "
                            f"{where} mounts")
            for item in secret.get("items", []):
                key = item["key"]
                # `kubectl create secret tls` names its keys tls.crt and tls.key; any other key
                # comes from --from-file=KEY=PATH.
                made_by_tls = key in ("tls.crt", "tls.key") and re.search(
                    rf"kubectl create secret tls {re.escape(name)}\b", readme)
                self.assertTrue(made_by_tls or f"--from-file={key}=" in readme,
                                f"README.md: nothing creates key {key} of Secret {name} that "
                                f"{where} mounts (kubectl create secret tls, or "
                                f"--from-file={key}=...)")

    def test_gradserver_runs_with_the_deployment_args(self):
        """Starts gradserver with the Deployment's own args, rewritten only for this host."""
        health_port_manifest = split_host_port(self.flags["health_address"], "--health_address")[1]
        mounts = secret_mounts(self.deployment, self.container)
        port, health_port, metrics_port = free_port(), free_port(), free_port()
        grace_period = self.deployment.get("spec.template.spec.terminationGracePeriodSeconds")
        annotations = self.deployment.get("spec.template.metadata.annotations", {})
        with tempfile.TemporaryDirectory() as tmp:
            files = make_secret_files(tmp)
            args = []
            for arg in self.args:
                name, _, value = arg[2:].partition("=")
                if name == "address":
                    arg = f"--address=127.0.0.1:{port}"
                elif name == "health_address":
                    arg = f"--health_address=127.0.0.1:{health_port}"
                elif name == "metrics_address":
                    arg = f"--metrics_address=127.0.0.1:{metrics_port}"
                elif os.path.dirname(value) in mounts:
                    key = mounts[os.path.dirname(value)].get(os.path.basename(value))
                    self.assertIsNotNone(key, f"{self.deployment.where(self.cfield + '.args')}: "
                                              f"--{name}={value} is no file of its secret volume")
                    self.assertIn(key, files, f"{self.deployment.where(self.cfield)}: the test "
                                              f"cannot make a file for secret key {key}")
                    arg = f"--{name}={files[key]}"
                args.append(arg)
            server = RunningServer(args)
            try:
                startup = self.container.get("startupProbe") or self.container.get("livenessProbe")
                budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
                self.assertTrue(server.wait_listening(budget),
                                f"{self.deployment.where(self.cfield + '.args')}: gradserver "
                                f"{' '.join(args)} did not print \"gradserver listening on\" "
                                f"within the startup probe's {budget} s; exit "
                                f"{server.proc.poll()}; stderr:\n{server.log()}")
                log = "\n".join(server.lines)
                self.assertIn(f"gradserver listening on 127.0.0.1:{port}", log)
                self.assertIn(f"gradserver health listening on 127.0.0.1:{health_port}", log)
                self.assertIn(f"gradserver metrics listening on 127.0.0.1:{metrics_port}", log)

                # Metrics where the annotations send Prometheus, in plaintext, without a token.
                path = annotations.get("prometheus.io/path", "/metrics")
                status, content_type, body = scrape_metrics(metrics_port, path)
                self.assertEqual((status, content_type), (200, METRICS_CONTENT_TYPE),
                                 f"GET {path} on the metrics port")
                self.assertIn("# TYPE gradserver_requests_total counter", body)

                code, out = gradctl("health", f"--server=127.0.0.1:{health_port}", "--timeout=10s")
                self.assertEqual((code, out.splitlines()[0] if out else ""), (0, "SERVING"),
                                 f"gradctl health on the plaintext health port (manifest port "
                                 f"{health_port_manifest}): {out}\nserver stderr:\n{server.log()}")

                # The main port: TLS with the mounted certificate, and the mounted token needed.
                tls = ["--tls", f"--tls_ca={files['tls.crt']}", f"--server=localhost:{port}"]
                if self.flags.get("tls_client_ca"):
                    # Mutual TLS: the throwaway certificate is also the client CA.
                    tls += [f"--tls_cert={files['tls.crt']}", f"--tls_key={files['tls.key']}"]
                code, out = gradctl("info", *tls, f"--auth_token_file={files['tokens']}",
                                    "--timeout=20s")
                self.assertEqual(code, 0, f"gradctl info over TLS with a token: {out}\n"
                                          f"server stderr:\n{server.log()}")
                code, out = gradctl("info", *tls, "--timeout=10s")
                self.assertNotEqual(code, 0, f"gradctl info without a token succeeded: {out}")
                self.assertIn("UNAUTHENTICATED", out, "gradctl info without a token")
                code, out = gradctl("info", f"--server=127.0.0.1:{port}",
                                    f"--auth_token_file={files['tokens']}", "--timeout=2s")
                self.assertNotEqual(code, 0,
                                    f"plaintext gradctl info on the TLS port succeeded: {out}")

                # SIGTERM with calls in flight: it must drain and exit 0 within what the pod
                # gives it after the preStop hook.
                load = subprocess.Popen(
                    [PATHS.gradctl, "bench", *tls, f"--auth_token_file={files['tokens']}",
                     "--workload=seed4", "--concurrency=2", "--duration=60s"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    # Calls are flowing once the request log shows answered ones.
                    logged = self.flags.get("log_requests", "true") != "false" and \
                        "nolog_requests" not in self.flags
                    deadline = time.monotonic() + (20 if logged else 1.5)
                    answered = 0
                    while time.monotonic() < deadline and load.poll() is None and \
                            (not logged or answered < 20):
                        time.sleep(0.1)
                        answered = sum("method=ComputeGradients" in line and "code=OK" in line
                                       for line in list(server.lines))
                    self.assertIsNone(load.poll(), "gradctl bench stopped before SIGTERM")
                    if logged:
                        self.assertGreater(answered, 0, "gradctl bench got no call answered "
                                                        f"before SIGTERM:\n{server.log()}")
                    allowed = grace_period - self.pre_stop_seconds()
                    code, elapsed = server.stop(timeout=allowed)
                finally:
                    if load.poll() is None:
                        load.kill()
                    load.wait()
                self.assertIsNotNone(code, f"gradserver still running {allowed:g} s after "
                                           "SIGTERM (terminationGracePeriodSeconds - preStop):\n"
                                           f"{server.log()}")
                self.assertEqual(code, 0,
                                 f"gradserver exited {code} after SIGTERM:\n{server.log()}")
                # The calls in flight are milliseconds long, so the stop takes the connection
                # closing the termination grace budgets for, and not much more.
                self.assertLessEqual(elapsed, CONNECTION_CLOSING_SECONDS + EXIT_MARGIN_SECONDS,
                                     f"gradserver took {elapsed:.2f} s to stop after SIGTERM with "
                                     "only short calls in flight")
                print(f"\n  Deployment args: exited 0 {elapsed:.2f} s after SIGTERM under load "
                      f"(allowed {allowed:g} s)", file=sys.stderr)
            finally:
                server.kill()


# ---------------------------------------------------------------------------------------------
# Docker Compose


class ComposeTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.path, cls.text, cls.body = load_compose()
        cls.services = cls.body.get("services") or {}

    def where(self, service, field=""):
        return f"deploy/docker-compose.yml: services.{service}" + (f".{field}" if field else "")

    def flags_of(self, name, service):
        command = service.get("command")
        self.assertIsInstance(command, list,
                              self.where(name, "command") + ": give a list of --flags")
        return parse_flags(command, self.where(name, "command"))

    def test_services_are_consistent_with_gradserver(self):
        self.assertGreaterEqual(len(self.services), 2, "deploy/docker-compose.yml: services: "
                                                       "fewer than two replicas")
        host_ports = []  # every published (host IP, port)
        grpc_host_ports = []  # those of --address
        for name, service in self.services.items():
            self.assertRegex(service.get("image", ""), r"(^|/)gradserver(:[\w.-]+)?$",
                             self.where(name, "image"))
            flags = self.flags_of(name, service)
            check_flags_accepted(self, flags, self.where(name, "command"))
            _, port = split_host_port(flags.get("address"), self.where(name, "command --address"))
            _, health_port = split_host_port(flags.get("health_address"),
                                             self.where(name, "command --health_address"))
            metrics_port = None
            if flags.get("metrics_address") is not None:
                _, metrics_port = split_host_port(flags["metrics_address"],
                                                  self.where(name, "command --metrics_address"))
            ports = service.get("ports") or []
            self.assertTrue(ports, self.where(name, "ports") + " is empty")
            published = []
            for p in ports:
                parts = str(p).split(":")
                self.assertIn(int(parts[-1]), (port, metrics_port),
                              f"{self.where(name, 'ports')}: {p} publishes neither the --address "
                              f"port {port} nor the --metrics_address port {metrics_port}")
                host_port = (parts[0] if len(parts) == 3 else "0.0.0.0", int(parts[-2]))
                host_ports.append(host_port)
                published.append(int(parts[-1]))
                if int(parts[-1]) == port:
                    grpc_host_ports.append(host_port)
            self.assertEqual(published.count(port), 1,
                             f"{self.where(name, 'ports')}: publish the --address port once")
            if metrics_port is not None:
                self.assertEqual(published.count(metrics_port), 1,
                                 f"{self.where(name, 'ports')}: publish the --metrics_address "
                                 f"port {metrics_port} once, for scrapers on the host")

            test = service.get("healthcheck", {}).get("test")
            self.assertIsInstance(test, list, self.where(name, "healthcheck.test"))
            self.assertEqual(test[:3], ["CMD", "gradctl", "health"],
                             self.where(name, "healthcheck.test") + ": use gradctl health")
            check_flags = parse_flags(test[3:], self.where(name, "healthcheck.test"))
            _, checked_port = split_host_port(check_flags.get("server"),
                                              self.where(name, "healthcheck.test --server"))
            self.assertEqual(checked_port, health_port,
                             f"{self.where(name, 'healthcheck.test')}: --server port "
                             f"{checked_port} is not the --health_address port {health_port}")
            check_timeout = compose_seconds(service["healthcheck"].get("timeout", "30s"),
                                            self.where(name, "healthcheck.timeout"))
            gradctl_timeout = compose_seconds(check_flags.get("timeout") or "60s",
                                              self.where(name, "healthcheck.test --timeout"))
            self.assertLess(gradctl_timeout, check_timeout,
                            f"{self.where(name, 'healthcheck')}: gradctl --timeout must be "
                            "shorter than the healthcheck's timeout")

            shutdown = seconds_flag(flags, "shutdown_grace_seconds", self.where(name, "command"))
            stop = compose_seconds(service.get("stop_grace_period", "10s"),
                                   self.where(name, "stop_grace_period"))
            needed = shutdown + CONNECTION_CLOSING_SECONDS + EXIT_MARGIN_SECONDS
            self.assertGreaterEqual(stop, needed,
                                    f"{self.where(name, 'stop_grace_period')}={stop:g}s is less "
                                    f"than --shutdown_grace_seconds {shutdown:g} s + closing "
                                    f"{CONNECTION_CLOSING_SECONDS:g} s + margin "
                                    f"{EXIT_MARGIN_SECONDS:g} s")
            self.assertIs(service.get("read_only"), True, self.where(name, "read_only"))
            self.assertRegex(str(service.get("user", "")), r"^10001(:|$)", self.where(name, "user"))
            self.assertIn("ALL", service.get("cap_drop", []), self.where(name, "cap_drop"))

            self.assertIn("mem_limit", service, self.where(name, "mem_limit"))
            check_memory_budget_fits(self, flags,
                                     compose_memory_bytes(service["mem_limit"],
                                                          self.where(name, "mem_limit")),
                                     self.where(name, "command"))

            threads = int(flags.get("threads_per_request") or 0)
            concurrent = int(flags.get("max_concurrent_requests") or 0)
            self.assertGreaterEqual(threads * concurrent, 1,
                                    f"{self.where(name, 'command')}: set --threads_per_request and "
                                    "--max_concurrent_requests; replicas share the host's cores")
            if "cpus" in service:
                self.assertLessEqual(threads * concurrent, float(service["cpus"]),
                                     f"{self.where(name, 'command')}: more compute threads than "
                                     f"cpus={service['cpus']}")

        self.assertEqual(len(host_ports), len(set(host_ports)),
                         f"deploy/docker-compose.yml: a host port is published twice: {host_ports}")
        target = "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in grpc_host_ports)
        self.assertTrue(target in self.text, "deploy/docker-compose.yml: the comment should show "
                                             f"the client target for these ports, {target}")

    def test_gradserver_runs_with_a_compose_command(self):
        name, service = next(iter(self.services.items()))
        port, health_port, metrics_port = free_port(), free_port(), free_port()
        args = []
        for arg in service["command"]:
            if arg.startswith("--address="):
                arg = f"--address=127.0.0.1:{port}"
            elif arg.startswith("--health_address="):
                arg = f"--health_address=127.0.0.1:{health_port}"
            elif arg.startswith("--metrics_address="):
                arg = f"--metrics_address=127.0.0.1:{metrics_port}"
            args.append(arg)
        server = RunningServer(args)
        try:
            self.assertTrue(server.wait_listening(30),
                            f"{self.where(name, 'command')}: gradserver {' '.join(args)} did not "
                            f"start; exit {server.proc.poll()}; stderr:\n{server.log()}")
            test = service["healthcheck"]["test"]
            check = []
            for arg in test[3:]:
                if arg.startswith("--server="):
                    arg = f"--server=127.0.0.1:{health_port}"
                check.append(arg)
            code, out = gradctl("health", *check)
            self.assertEqual(code, 0, f"{self.where(name, 'healthcheck.test')}: {out}\n"
                                      f"server stderr:\n{server.log()}")
            if any(arg.startswith("--metrics_address=") for arg in args):
                status, content_type, _ = scrape_metrics(metrics_port, "/metrics")
                self.assertEqual((status, content_type), (200, METRICS_CONTENT_TYPE),
                                 f"{self.where(name, 'command')}: GET /metrics")
            stop = compose_seconds(service["stop_grace_period"],
                                   self.where(name, "stop_grace_period"))
            code, elapsed = server.stop(timeout=stop)
            self.assertEqual(code, 0, f"gradserver ({self.where(name, 'command')}) exit {code} "
                                      f"after SIGTERM:\n{server.log()}")
            # Idle, it should take only the connection-closing time.
            self.assertLessEqual(elapsed, CONNECTION_CLOSING_SECONDS + EXIT_MARGIN_SECONDS,
                                 f"an idle gradserver took {elapsed:.2f} s to stop after SIGTERM")
            print(f"\n  Compose command: idle, exited 0 {elapsed:.2f} s after SIGTERM "
                  f"(stop_grace_period {stop:g} s)", file=sys.stderr)
        finally:
            server.kill()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gradserver", default=os.environ.get("GRADSERVER"))
    parser.add_argument("--gradctl", default=os.environ.get("GRADCTL"))
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--root", default=os.environ.get("GRAD_SOURCE_DIR") or repo)
    known, rest = parser.parse_known_args()
    for name in ("gradserver", "gradctl"):
        path = getattr(known, name)
        if not path or not os.access(path, os.X_OK):
            parser.error(f"--{name}={path}: not an executable; build it first")
    PATHS.gradserver, PATHS.gradctl, PATHS.root = known.gradserver, known.gradctl, known.root
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)


if __name__ == "__main__":
    main()
