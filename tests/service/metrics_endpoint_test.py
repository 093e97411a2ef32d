#!/usr/bin/env python3
"""gradserver's Prometheus endpoint (--metrics_address) end to end, against the real binaries.

Starts gradserver with --metrics_address=127.0.0.1:0 (learning the port from its start-up line
"gradserver metrics listening on HOST:PORT"), makes a known number of calls of every kind
through gradctl (good ones and failing ones: a bad network, an oversized request_id, a full
queue, a shared memory region over the limit, calls without a bearer token), and scrapes
/metrics before, during and after load and during the drain after SIGTERM. Every scrape is
parsed line by line by a strict checker of the text format (version 0.0.4) and by
prometheus_client.parser.text_string_to_metric_families from Debian's python3-prometheus-client;
any line either rejects fails the test. Then:
  - gradserver_requests_total{method,code} equals the calls made, by method and code, and the
    request log's lines;
  - every histogram's _count equals its calls (the phases' only those that reached the phase),
    its buckets are cumulative up to +Inf = _count, and its _sum matches the request log's
    microseconds;
  - the byte counters equal the request log's bytes_in and bytes_out;
  - the gauges are sane (limits as configured, in-flight within them, 0 when idle, the plan
    cache after a known sequence, gradserver_info as `gradctl info` reports);
  - other paths are 404.

    /usr/bin/python3 tests/service/metrics_endpoint_test.py --gradserver=BUILD/server/gradserver \\
        --gradctl=BUILD/client/gradctl [--root=REPO] [unittest arguments]

The paths may also come from the environment: GRADSERVER, GRADCTL, GRAD_SOURCE_DIR. Needs
python3-prometheus-client; no network.
"""

import argparse
import collections
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.request

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError as e:
    sys.exit(f"metrics_endpoint_test: {e}; install python3-prometheus-client "
             "(deploy/install-deps.sh) and run with /usr/bin/python3")

PATHS = argparse.Namespace(gradserver=None, gradctl=None, root=None)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
COMPUTE_METHODS = ("Forward", "ComputeGradients")
METHODS = COMPUTE_METHODS + ("GetInfo", "RegisterSharedMemory", "UnregisterSharedMemory",
                             "GetSharedMemoryStatus")
PHASES = ("decode", "queue", "compute", "encode")
# The request log rounds each duration down to whole microseconds; a histogram's _sum (in
# seconds, of the same nanosecond measurements) lies between the log's sum and that plus 1 us
# per call. The slack covers summing doubles.
LOG_ROUNDING_SECONDS = 1e-6
FLOAT_SLACK = 1e-9

# seed_conv1 as a grad.v1.Network (tests/fixtures/seed_conv1/case.txt), and the same layer
# expecting 3 input channels, which the engine refuses for a 1-channel input.
GOOD_NET = {"layers": [{"name": "conv1", "conv2d": {"inChannels": 1, "outChannels": 8,
                                                    "kernelSize": [3], "padding": [1]}}]}
BAD_NET = {"layers": [{"name": "conv1", "conv2d": {"inChannels": 3, "outChannels": 8,
                                                   "kernelSize": [3], "padding": [1]}}]}
TOKEN = "metrics-test-token"


# ---------------------------------------------------------------------------------------------
# The text format, strictly


NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL_NAME = r"[a-zA-Z_][a-zA-Z0-9_]*"
LABEL_VALUE = r'"(?:[^"\\\n]|\\[\\"n])*"'
LABELS = rf"\{{{LABEL_NAME}={LABEL_VALUE}(?:,{LABEL_NAME}={LABEL_VALUE})*\}}"
VALUE = r"(?:[+-]?Inf|NaN|[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)"
HELP_RE = re.compile(rf"# HELP ({NAME}) (.*)")
TYPE_RE = re.compile(rf"# TYPE ({NAME}) (counter|gauge|histogram|summary|untyped)")
SAMPLE_RE = re.compile(rf"({NAME})({LABELS})? ({VALUE})")
SUFFIXES = {"counter": [""], "gauge": [""], "untyped": [""],
            "histogram": ["_bucket", "_sum", "_count"], "summary": ["", "_sum", "_count"]}


def unescape(value):
    return re.sub(r'\\([\\"n])', lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def parse_labels(text):
    if not text:
        return ()
    pairs = re.findall(rf"({LABEL_NAME})=({LABEL_VALUE})", text[1:-1])
    return tuple((name, unescape(value[1:-1])) for name, value in pairs)


class Scrape:
    """One /metrics response, checked line by line; samples as {(name, labels): value}."""

    def __init__(self, text):
        self.text = text
        self.samples = {}
        self.types = {}
        self.check_strictly()
        self.check_with_prometheus_client()

    def fail(self, number, line, why):
        raise AssertionError(f"/metrics line {number}: {why}: {line!r}")

    def check_strictly(self):
        if not self.text.endswith("\n"):
            raise AssertionError("/metrics does not end with a newline")
        family = None  # (name, type) of the current family
        helped = set()
        for number, line in enumerate(self.text[:-1].split("\n"), start=1):
            if not line:
                self.fail(number, line, "empty line")
            if line.startswith("#"):
                m = HELP_RE.fullmatch(line)
                if m:
                    if m.group(1) in helped:
                        self.fail(number, line, "a second HELP for the family")
                    helped.add(m.group(1))
                    if "\\" in re.sub(r"\\[\\n]", "", m.group(2)):
                        self.fail(number, line, "HELP with an escape other than \\\\ and \\n")
                    family = None
                    continue
                m = TYPE_RE.fullmatch(line)
                if not m:
                    self.fail(number, line, "a comment that is neither # HELP nor # TYPE")
                name, kind = m.groups()
                if name in self.types:
                    self.fail(number, line, "a second TYPE for the family")
                if name not in helped:
                    self.fail(number, line, "TYPE without a HELP before it")
                self.types[name] = kind
                family = (name, kind)
                continue
            m = SAMPLE_RE.fullmatch(line)
            if not m:
                self.fail(number, line, "not NAME{LABELS} VALUE")
            name, labels, value = m.group(1), parse_labels(m.group(2)), m.group(3)
            if family is None or name not in [family[0] + s for s in SUFFIXES[family[1]]]:
                self.fail(number, line, f"a sample outside its family (current: {family})")
            if len({n for n, _ in labels}) != len(labels):
                self.fail(number, line, "a label given twice")
            if (name, labels) in self.samples:
                self.fail(number, line, "the same series twice")
            self.samples[(name, labels)] = float(value)
        if set(helped) != set(self.types):
            raise AssertionError(f"/metrics: families with HELP but no TYPE: "
                                 f"{sorted(set(helped) - set(self.types))}")

    def check_with_prometheus_client(self):
        try:
            families = list(text_string_to_metric_families(self.text))
        except Exception as e:  # noqa: BLE001 - any parse error fails the test
            raise AssertionError(f"prometheus_client could not parse /metrics: {e!r}")
        names = [f.name for f in families]
        if len(names) != len(set(names)):
            raise AssertionError(f"prometheus_client saw a family twice: {names}")
        untyped = [f.name for f in families if f.type == "untyped"]
        if untyped:
            raise AssertionError(f"prometheus_client read samples outside a typed family: "
                                 f"{untyped}")
        parsed = sum(len(f.samples) for f in families)
        if parsed != len(self.samples):
            raise AssertionError(f"prometheus_client read {parsed} samples, the text has "
                                 f"{len(self.samples)}")
        mine = {(n, tuple(sorted(l))): v for (n, l), v in self.samples.items()}
        for f in families:
            for s in f.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if key not in mine or not (mine[key] == s.value or
                                           (math.isnan(mine[key]) and math.isnan(s.value))):
                    raise AssertionError(f"prometheus_client read {s} differently")

    def value(self, name, **labels):
        for (sample_name, sample_labels), value in self.samples.items():
            if sample_name == name and dict(sample_labels) == labels:
                return value
        return None

    def series(self, name):
        """[(labels dict, value)] of every sample called `name`."""
        return [(dict(l), v) for (n, l), v in self.samples.items() if n == name]

    def requests(self):
        """{(method, code): count} of gradserver_requests_total."""
        return {(l["method"], l["code"]): v
                for l, v in self.series("gradserver_requests_total")}

    def histogram(self, name, **labels):
        """(buckets [(le, count)], sum, count) of one histogram series; checks its shape."""
        buckets = []
        for l, v in self.series(name + "_bucket"):
            le = l.pop("le")
            if l == labels:
                buckets.append((float(le), v))
        buckets.sort()
        total = self.value(name + "_sum", **labels)
        count = self.value(name + "_count", **labels)
        where = f"{name}{labels}"
        assert buckets and total is not None and count is not None, f"{where}: not in /metrics"
        assert math.isinf(buckets[-1][0]), f"{where}: no le=\"+Inf\" bucket"
        counts = [c for _, c in buckets]
        assert counts == sorted(counts), f"{where}: buckets are not cumulative: {buckets}"
        assert counts[-1] == count, f"{where}: +Inf bucket {counts[-1]} != _count {count}"
        return buckets, total, count


def scrape(port, path="/metrics"):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        assert response.status == 200, f"GET {path}: {response.status}"
        content_type = response.headers.get("Content-Type")
        assert content_type == CONTENT_TYPE, f"GET {path}: Content-Type {content_type!r}"
        return Scrape(response.read().decode("utf-8"))


# ---------------------------------------------------------------------------------------------
# The binaries


class RunningServer:
    """gradserver in a child process, its stderr collected by a thread."""

    def __init__(self, args):
        self.lines = []
        self.lock = threading.Lock()
        self.proc = subprocess.Popen([PATHS.gradserver] + args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.port = self.wait_for_port("gradserver listening on ")
        self.metrics_port = self.port and self.wait_for_port("gradserver metrics listening on ")

    def _read(self):
        for line in self.proc.stderr:
            with self.lock:
                self.lines.append(line.rstrip("\n"))

    def log(self):
        with self.lock:
            return list(self.lines)

    def wait_for_port(self, marker, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log():
                if line.startswith(marker):
                    return int(line.rsplit(":", 1)[1])
            if self.proc.poll() is not None:
                self.reader.join(timeout=2)
                return 0
            time.sleep(0.02)
        return 0

    def request_log(self, method=None):
        """The request log's lines as dicts of their key=value fields."""
        entries = []
        for line in self.log():
            if not line.startswith("method="):
                continue
            fields = dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"(?:\.\.\.)?|\S+)', line))
            if method is None or fields["method"] == method:
                entries.append(fields)
        return entries

    def stop(self, timeout=30):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=2)
        self.proc.stderr.close()


def gradctl(*args, check=None, timeout=120):
    """Runs gradctl without a token from the environment; returns (exit code, output)."""
    env = {k: v for k, v in os.environ.items() if k != "GRADCTL_AUTH_TOKEN"}
    run = subprocess.run([PATHS.gradctl] + list(args), capture_output=True, text=True,
                         timeout=timeout, env=env)
    out = (run.stdout + run.stderr).strip()
    if check is not None and run.returncode != check:
        raise AssertionError(f"gradctl {' '.join(args)}: exit {run.returncode}, expected "
                             f"{check}:\n{out}")
    return run.returncode, out


# ---------------------------------------------------------------------------------------------
# The test


class Expected:
    """The calls made, and how far each got: "refused" before its request was parsed,
    "decoded" (refused after), or "computed" (it reached a compute thread)."""

    def __init__(self):
        self.calls = collections.Counter()  # (method, code) -> n
        self.stages = collections.Counter()  # (method, stage) -> n

    def add(self, method, code, stage="computed", n=1):
        self.calls[(method, code)] += n
        self.stages[(method, stage)] += n

    def reached(self, method, phase):
        stages = {"decode": ("decoded", "computed")}.get(phase, ("computed",))
        return sum(self.stages[(method, s)] for s in stages)


class MetricsEndpointTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.dir = cls.tmp.name
        cls.fixture = os.path.join(PATHS.root, "tests", "fixtures", "seed_conv1")
        for name, net in (("good.json", GOOD_NET), ("bad.json", BAD_NET)):
            with open(os.path.join(cls.dir, name), "w", encoding="utf-8") as f:
                json.dump(net, f)
        cls.tokens = os.path.join(cls.dir, "tokens")
        with open(cls.tokens, "w", encoding="utf-8") as f:
            f.write(TOKEN + "\n")
        cls.outputs = 0

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def start(self, *flags):
        server = RunningServer(["--address=127.0.0.1:0", "--metrics_address=127.0.0.1:0",
                                "--threads_per_request=1", *flags])
        self.addCleanup(server.kill)
        self.assertTrue(server.port and server.metrics_port,
                        "gradserver did not print its listening addresses; stderr:\n" +
                        "\n".join(server.log()))
        return server

    def grad(self, server, net="good.json", *extra, check=0):
        MetricsEndpointTest.outputs += 1
        return gradctl("grad", f"--server=127.0.0.1:{server.port}",
                       f"--net={os.path.join(self.dir, net)}",
                       f"--input={self.fixture}/input.npy", f"--params={self.fixture}/params",
                       f"--target={self.fixture}/target.npy",
                       f"--out={self.dir}/out{self.outputs}", *extra, check=check)

    def forward(self, server, net="good.json", *extra, check=0):
        MetricsEndpointTest.outputs += 1
        return gradctl("forward", f"--server=127.0.0.1:{server.port}",
                       f"--net={os.path.join(self.dir, net)}",
                       f"--input={self.fixture}/input.npy", f"--params={self.fixture}/params",
                       f"--out={self.dir}/out{self.outputs}", *extra, check=check)

    def wait_for_log(self, server, expected):
        """Until the request log has a line for every call (it is written after the answer)."""
        want = sum(expected.calls.values())
        deadline = time.monotonic() + 10
        while len(server.request_log()) < want and time.monotonic() < deadline:
            time.sleep(0.02)
        self.assertEqual(len(server.request_log()), want,
                         "request log lines vs calls made:\n" + "\n".join(server.log()))

    def check_against(self, server, metrics, expected):
        """The request metrics against the calls made and against the request log."""
        self.wait_for_log(server, expected)
        made = {k: v for k, v in expected.calls.items() if v}
        counted = {k: v for k, v in metrics.requests().items() if v}
        self.assertEqual(counted, made, "gradserver_requests_total vs the calls made")
        logged = collections.Counter((e["method"], e["code"]) for e in server.request_log())
        self.assertEqual(counted, dict(logged), "gradserver_requests_total vs the request log")
        for method in METHODS:
            calls = sum(v for (m, _), v in made.items() if m == method)
            _, total, count = metrics.histogram("gradserver_request_duration_seconds",
                                                method=method)
            self.assertEqual(count, calls, f"request_duration_seconds_count{{method={method}}}")
            if method not in COMPUTE_METHODS:
                continue
            entries = server.request_log(method)
            self.check_sum(total, count, sum(int(e["total_us"]) for e in entries),
                           f"request_duration_seconds_sum{{method={method}}}")
            for phase in PHASES:
                _, phase_sum, phase_count = metrics.histogram(
                    "gradserver_request_phase_duration_seconds", method=method, phase=phase)
                self.assertEqual(phase_count, expected.reached(method, phase),
                                 f"request_phase_duration_seconds_count{{method={method},"
                                 f"phase={phase}}}")
                self.check_sum(phase_sum, phase_count,
                               sum(int(e[f"{phase}_us"]) for e in entries),
                               f"request_phase_duration_seconds_sum{{{method},{phase}}}")
            for direction, field in (("request", "bytes_in"), ("response", "bytes_out")):
                self.assertEqual(metrics.value(f"gradserver_{direction}_bytes_total",
                                               method=method),
                                 sum(int(e[field]) for e in entries),
                                 f"gradserver_{direction}_bytes_total{{method={method}}} vs "
                                 f"the request log's {field}")

    def check_sum(self, seconds, count, logged_us, what):
        low = logged_us * 1e-6 - FLOAT_SLACK
        high = (logged_us + count) * LOG_ROUNDING_SECONDS + FLOAT_SLACK
        self.assertTrue(low <= seconds <= high,
                        f"{what}={seconds!r} s is not within the request log's {logged_us} us "
                        f"+ up to 1 us for each of {count} calls")

    def check_idle_gauges(self, metrics, threads, queue):
        for name, want in (("gradserver_calls_in_progress", 0), ("gradserver_compute_running", 0),
                           ("gradserver_compute_queued", 0), ("gradserver_compute_threads",
                                                              threads),
                           ("gradserver_compute_queue_limit", queue),
                           ("gradserver_shared_memory_regions", 0),
                           ("gradserver_shared_memory_mapped_bytes", 0)):
            self.assertEqual(metrics.value(name), want, name)

    def test_metrics_count_every_call(self):
        server = self.start("--allow_shared_memory", "--max_shared_memory_mb=1",
                            "--max_concurrent_requests=1", "--max_queued_requests=1",
                            "--max_memory_mb=768")
        expected = Expected()

        # Before any call: every method's series at 0, the families typed, the build info.
        first = scrape(server.metrics_port)
        self.check_against(server, first, expected)
        for method in METHODS:
            self.assertEqual(first.value("gradserver_requests_total", method=method, code="OK"),
                             0, method)
        for name, kind in (("gradserver_requests_total", "counter"),
                           ("gradserver_request_duration_seconds", "histogram"),
                           ("gradserver_request_phase_duration_seconds", "histogram"),
                           ("gradserver_request_bytes_total", "counter"),
                           ("gradserver_response_bytes_total", "counter"),
                           ("gradserver_info", "gauge"), ("gradserver_uptime_seconds", "gauge"),
                           ("gradserver_calls_in_progress", "gauge"),
                           ("gradserver_compute_running", "gauge"),
                           ("gradserver_compute_queued", "gauge"),
                           ("gradserver_compute_threads", "gauge"),
                           ("gradserver_compute_queue_limit", "gauge"),
                           ("gradserver_plan_cache_entries", "gauge"),
                           ("gradserver_plan_cache_hits_total", "counter"),
                           ("gradserver_plan_cache_misses_total", "counter"),
                           ("gradserver_shared_memory_regions", "gauge"),
                           ("gradserver_shared_memory_mapped_bytes", "gauge"),
                           ("gradserver_memory_limit_bytes", "gauge"),
                           ("gradserver_memory_reserved_bytes", "gauge"),
                           ("gradserver_memory_cached_bytes", "gauge"),
                           ("gradserver_memory_peak_bytes", "gauge"),
                           ("gradserver_memory_reservations_refused_total", "counter"),
                           ("gradserver_memory_reservations_waiting", "gauge"),
                           ("gradserver_memory_reservations_waited_total", "counter"),
                           ("gradserver_memory_returned_to_system_total", "counter"),
                           ("gradserver_process_resident_bytes", "gauge"),
                           ("gradserver_plan_cache_bytes", "gauge"),
                           ("gradserver_plan_cache_limit_bytes", "gauge"),
                           ("gradserver_plan_cache_evictions_total", "counter"),
                           ("gradserver_responses_cancelled_undrained_total", "counter")):
            self.assertEqual(first.types.get(name), kind, name)
        self.assertEqual(first.value("gradserver_memory_limit_bytes"), 768 << 20)
        self.assertEqual(first.value("gradserver_plan_cache_limit_bytes"), 192 << 20)
        self.check_idle_gauges(first, threads=1, queue=1)
        for name in ("gradserver_plan_cache_entries", "gradserver_plan_cache_hits_total",
                     "gradserver_plan_cache_misses_total"):
            self.assertEqual(first.value(name), 0, name)

        # GetInfo; its answer names what gradserver_info labels.
        _, out = gradctl("info", f"--server=127.0.0.1:{server.port}", "--json", check=0)
        expected.add("GetInfo", "OK", "refused")
        gradctl("info", f"--server=127.0.0.1:{server.port}", check=0)
        expected.add("GetInfo", "OK", "refused")
        info = json.loads(out)
        (labels, value), = first.series("gradserver_info")
        self.assertEqual(value, 1)
        self.assertEqual(labels, {"version": info["server_version"],
                                  "onednn_version": info["onednn_version"],
                                  "cpu_isa": info["cpu_isa"]})

        # Good calls: the first compiles the plan, the next ones find it.
        for _ in range(3):
            self.grad(server)
            expected.add("ComputeGradients", "OK")
        for _ in range(2):
            self.forward(server)
            expected.add("Forward", "OK")
        # Failing calls: a network the engine refuses (on the compute thread), a request_id the
        # service refuses while decoding.
        self.grad(server, "bad.json", check=1)
        expected.add("ComputeGradients", "INVALID_ARGUMENT")
        self.forward(server, "bad.json", check=1)
        expected.add("Forward", "INVALID_ARGUMENT")
        self.grad(server, "good.json", "--request_id=" + "x" * 200, check=1)
        expected.add("ComputeGradients", "INVALID_ARGUMENT", "decoded")
        # Shared memory: register, compute, unregister; then a region over --max_shared_memory_mb
        # (seed4_b32's tensors, about 20 MB) is refused, and gradctl stops there.
        self.grad(server, "good.json", "--shared_memory")
        expected.add("RegisterSharedMemory", "OK", "refused")
        expected.add("ComputeGradients", "OK")
        expected.add("UnregisterSharedMemory", "OK", "refused")
        _, out = gradctl("bench", f"--server=127.0.0.1:{server.port}", "--workload=seed4_b32",
                         "--requests=1", "--shared_memory", check=1)
        self.assertIn("RESOURCE_EXHAUSTED", out)
        expected.add("RegisterSharedMemory", "RESOURCE_EXHAUSTED", "refused")

        after_calls = scrape(server.metrics_port)
        self.check_against(server, after_calls, expected)
        self.check_idle_gauges(after_calls, threads=1, queue=1)
        # Two plans (all gradients, forward only), each compiled once: 3 good gradient calls and
        # the shared memory one (same network and shapes) hit the first plan 3 times, the 2
        # forward calls the second once; the refused calls never reach the plan cache.
        self.assertEqual(after_calls.value("gradserver_plan_cache_entries"), 2)
        self.assertEqual(after_calls.value("gradserver_plan_cache_misses_total"), 2)
        self.assertEqual(after_calls.value("gradserver_plan_cache_hits_total"), 3 + 1)
        self.assertGreater(after_calls.value("gradserver_uptime_seconds"),
                           first.value("gradserver_uptime_seconds"))
        # Between calls nothing is reserved; the plans and their idle workspaces are cached,
        # and that is what the plan cache reports.
        self.assertEqual(after_calls.value("gradserver_memory_reserved_bytes"), 0)
        self.assertGreater(after_calls.value("gradserver_memory_cached_bytes"), 0)
        self.assertEqual(after_calls.value("gradserver_memory_cached_bytes"),
                         after_calls.value("gradserver_plan_cache_bytes"))
        self.assertGreaterEqual(after_calls.value("gradserver_memory_peak_bytes"),
                                after_calls.value("gradserver_memory_cached_bytes"))
        self.assertLessEqual(after_calls.value("gradserver_memory_peak_bytes"), 768 << 20)
        self.assertGreater(after_calls.value("gradserver_process_resident_bytes"), 1 << 20)
        self.assertEqual(after_calls.value("gradserver_responses_cancelled_undrained_total"), 0)

        # Load: more callers than the one compute thread and one queue slot take, so some calls
        # are refused with RESOURCE_EXHAUSTED while the others compute. Scraped throughout.
        bench = subprocess.Popen(
            [PATHS.gradctl, "bench", f"--server=127.0.0.1:{server.port}",
             "--workload=seed4_b32", "--concurrency=6", "--requests=40", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        during = []
        try:
            while bench.poll() is None:
                during.append(scrape(server.metrics_port))
                time.sleep(0.02)
            out, err = bench.communicate(timeout=120)
        finally:
            if bench.poll() is None:
                bench.kill()
                bench.wait()
        report = json.loads(out.strip().splitlines()[-1])
        self.assertEqual(report["ok"] + report["failed"], 40, f"gradctl bench: {out}{err}")
        self.assertEqual(set(report["errors"]) - {"RESOURCE_EXHAUSTED"}, set(),
                         f"gradctl bench: {out}{err}")
        self.assertGreater(report["ok"], 0, f"gradctl bench: {out}{err}")
        expected.add("ComputeGradients", "OK", n=report["ok"] + 1)  # and the warm-up call
        refused = report["errors"].get("RESOURCE_EXHAUSTED", 0)
        if refused:
            expected.add("ComputeGradients", "RESOURCE_EXHAUSTED", "decoded", n=refused)

        self.assertTrue(during, "no scrape while gradctl bench ran")
        busy = 0
        previous = after_calls
        for metrics in during:
            in_progress = metrics.value("gradserver_calls_in_progress")
            running = metrics.value("gradserver_compute_running")
            queued = metrics.value("gradserver_compute_queued")
            self.assertTrue(0 <= running <= 1, f"compute_running={running} with 1 thread")
            # A task counts as queued until a worker takes it, also when one is free (the
            # pool's bound is on the tasks beyond the running ones): at most threads + slots.
            self.assertTrue(0 <= queued <= 2, f"compute_queued={queued} with 1 thread and 1 "
                                              "queue slot")
            self.assertTrue(0 <= in_progress <= 6, f"calls_in_progress={in_progress} with 6 "
                                                   "callers")
            busy += in_progress > 0
            # Counters never go down; histograms stay well formed.
            for key, value in previous.requests().items():
                self.assertGreaterEqual(metrics.requests().get(key, 0), value, key)
            for method in METHODS:
                metrics.histogram("gradserver_request_duration_seconds", method=method)
            previous = metrics
        self.assertGreater(busy, 0, f"none of {len(during)} scrapes during the load saw a call "
                                    "in progress")
        print(f"\n  load: {len(during)} scrapes, {busy} with calls in progress; gradctl bench: "
              f"{report['ok']} OK, {refused} RESOURCE_EXHAUSTED", file=sys.stderr)

        # A call is counted as answered a moment after its client has the answer: wait for
        # the gauges to settle rather than race them.
        deadline = time.monotonic() + 10
        while True:
            after_load = scrape(server.metrics_port)
            if (after_load.value("gradserver_calls_in_progress") == 0 and
                    after_load.value("gradserver_compute_running") == 0) or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.check_against(server, after_load, expected)
        self.check_idle_gauges(after_load, threads=1, queue=1)

        # Only /metrics is served.
        for path in ("/", "/metrics/", "/metricsz", "/healthz"):
            with self.assertRaises(urllib.error.HTTPError, msg=path) as caught:
                scrape(server.metrics_port, path)
            self.assertEqual(caught.exception.code, 404, path)

        # SIGTERM with calls in flight (two callers keep the compute thread and the queue slot
        # busy): scrapes keep working while the server drains, and see the calls it refuses.
        load = subprocess.Popen(
            [PATHS.gradctl, "bench", f"--server=127.0.0.1:{server.port}", "--workload=seed4_b32",
             "--concurrency=2", "--duration=60s"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while (scrape(server.metrics_port).value("gradserver_requests_total",
                                                     method="ComputeGradients", code="OK") <
                   after_load.value("gradserver_requests_total", method="ComputeGradients",
                                    code="OK") + 3 and time.monotonic() < deadline):
                time.sleep(0.05)
            server.proc.send_signal(signal.SIGTERM)
            draining = []
            while server.proc.poll() is None:
                try:
                    draining.append(scrape(server.metrics_port))
                except (urllib.error.URLError, ConnectionError):
                    break
            code = server.proc.wait(timeout=30)
        finally:
            if load.poll() is None:
                load.kill()
            load.wait()
        self.assertEqual(code, 0, "gradserver exit code after SIGTERM:\n" +
                         "\n".join(server.log()[-20:]))
        self.assertTrue(draining, "no scrape succeeded after SIGTERM, during the drain")
        refused = max(m.value("gradserver_requests_total", method="ComputeGradients",
                              code="UNAVAILABLE") or 0 for m in draining)
        self.assertGreater(refused, 0, f"none of {len(draining)} scrapes after SIGTERM saw a call "
                                       "refused (UNAVAILABLE) by the draining server")
        print(f"  drain: {len(draining)} scrapes after SIGTERM, the last saw {refused:g} calls "
              "refused UNAVAILABLE; exit 0", file=sys.stderr)

    def test_unauthenticated_calls_are_counted(self):
        server = self.start(f"--auth_token_file={self.tokens}")
        expected = Expected()
        for _ in range(2):
            _, out = gradctl("info", f"--server=127.0.0.1:{server.port}", check=1)
            self.assertIn("UNAUTHENTICATED", out)
            expected.add("GetInfo", "UNAUTHENTICATED", "refused")
        self.grad(server, check=1)
        expected.add("ComputeGradients", "UNAUTHENTICATED", "refused")
        self.forward(server, check=1)
        expected.add("Forward", "UNAUTHENTICATED", "refused")
        gradctl("info", f"--server=127.0.0.1:{server.port}", f"--auth_token_file={self.tokens}",
                check=0)
        expected.add("GetInfo", "OK", "refused")
        self.grad(server, "good.json", f"--auth_token_file={self.tokens}")
        expected.add("ComputeGradients", "OK")
        metrics = scrape(server.metrics_port)
        self.check_against(server, metrics, expected)
        # The metrics port needs no token: it serves nothing but these numbers.
        self.assertEqual(server.stop(), 0)


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
