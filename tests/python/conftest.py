"""Fixtures of the Python client's tests: real gradserver processes on free loopback ports.

    gradserver_binary   path of the binary: $GRADSERVER_BINARY, else build/server/gradserver
    server              a session-wide gradserver; its target "127.0.0.1:PORT"
    client              a gradservice.Client connected to `server`
    start_server        start_server(*flags) starts another gradserver with extra flags and
                        returns its target (a str with .log() and .process), stopped at test end
    repo_root           the repository's root (pathlib.Path)
    tolerance           tests/tolerance.h's kRelativeTolerance
    sharded_tolerance   tests/tolerance.h's kShardedRelativeTolerance
    pki                 a throwaway CA and certificates (tests/service/make_test_pki.sh)

The package is imported from python/ of this checkout unless PYTHONPATH names another.
"""

import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
if not any(pathlib.Path(p).resolve() == REPO_ROOT / "python"
           for p in sys.path if p and os.path.isdir(p)):
    sys.path.insert(0, str(REPO_ROOT / "python"))

import gradservice  # noqa: E402  pylint: disable=wrong-import-position

_STARTUP_SECONDS = 60
_LISTENING = re.compile(r"^gradserver listening on (\S+)$")


def read_tolerance(name):
    """The value of `inline constexpr double <name> = ...;` in tests/tolerance.h."""
    text = (REPO_ROOT / "tests" / "tolerance.h").read_text(encoding="utf-8")
    match = re.search(rf"\b{name}\s*=\s*([0-9.eE+-]+)\s*;", text)
    if match is None:
        raise LookupError(f"tests/tolerance.h defines no {name}")
    return float(match.group(1))


class ServerTarget(str):
    """A running gradserver's "127.0.0.1:PORT", with its process and its stderr lines."""

    process = None
    _lines = None
    _lock = None

    def log(self):
        with self._lock:
            return list(self._lines)

    def stop(self, timeout=30):
        """SIGTERM, then the exit code (a server that does not drain in time is killed)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def launch(binary, *flags):
    """Starts gradserver on a free loopback port with `flags`; its ServerTarget once it listens.
    Raises RuntimeError with its stderr if it exits or does not listen in time."""
    args = [str(binary), "--address=127.0.0.1:0", "--shutdown_grace_seconds=5", *flags]
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    lines, lock = [], threading.Lock()
    listening = threading.Event()
    found = []

    def read():
        for line in process.stderr:
            line = line.rstrip("\n")
            with lock:
                lines.append(line)
            match = _LISTENING.match(line)
            if match and not found:
                found.append(match.group(1))
                listening.set()
        listening.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + _STARTUP_SECONDS
    while not listening.wait(0.05):
        if time.monotonic() > deadline or process.poll() is not None:
            break
    if not found:
        process.kill()
        process.wait()
        with lock:
            log = "\n".join(lines)
        raise RuntimeError(f"{' '.join(args)} did not start listening; stderr:\n{log}")
    target = ServerTarget(found[0])
    target.process, target._lines, target._lock = process, lines, lock
    return target


@pytest.fixture(scope="session")
def repo_root():
    return REPO_ROOT


@pytest.fixture(scope="session")
def tolerance():
    return read_tolerance("kRelativeTolerance")


@pytest.fixture(scope="session")
def sharded_tolerance():
    return read_tolerance("kShardedRelativeTolerance")


@pytest.fixture(scope="session")
def gradserver_binary():
    path = pathlib.Path(os.environ.get("GRADSERVER_BINARY",
                                       REPO_ROOT / "build" / "server" / "gradserver"))
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is not an executable gradserver; build it (cmake --build build "
                    "--target gradserver) or set GRADSERVER_BINARY")
    return path


@pytest.fixture(scope="session")
def server(gradserver_binary):
    target = launch(gradserver_binary)
    yield target
    code = target.stop()
    assert code == 0, f"gradserver exited with {code}; stderr:\n" + "\n".join(target.log())


@pytest.fixture
def client(server):
    with gradservice.Client(server) as c:
        yield c


@pytest.fixture
def start_server(gradserver_binary):
    started = []

    def start(*flags):
        target = launch(gradserver_binary, *flags)
        started.append(target)
        return target

    yield start
    for target in started:
        target.stop()


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    subprocess.run(["bash", str(REPO_ROOT / "tests" / "service" / "make_test_pki.sh"),
                    str(directory)], check=True)
    return directory
