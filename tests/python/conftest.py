"""Fixtures for Warren's Python (pika) conformance tests.

The session fixture ``broker`` starts one Warren process for the whole test
session:

* the binary is ``$WARREN_BIN`` if set, else ``<repo>/target/release/warren``,
  else ``<repo>/target/debug/warren``;
* it listens on a free loopback port and keeps its data in a temporary
  ``--data-dir`` (under pytest's basetemp, so ``broker.log`` is kept there
  after the run for post-mortems);
* it is killed at the end of the session.

Set ``WARREN_AMQP_URL`` (e.g. ``amqp://guest:guest@127.0.0.1:5672/%2F``) to run
the same tests against an already running broker instead -- handy to check
that a test encodes RabbitMQ's behaviour by pointing it at a real RabbitMQ
(``WARREN_HTTP_PORT`` names its management port, e.g. 15672, for the API tests).
"""

import itertools
import os
import re
import socket
import subprocess
import time
import uuid
from pathlib import Path
from urllib.parse import unquote, urlparse

import pika
import pika.exceptions
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 20.0


class BrokerInfo:
    """Where the broker under test listens, and how to talk to it."""

    def __init__(self, host, port, username="guest", password="guest",
                 vhost="/", process=None, log_path=None, http_port=None,
                 amqps_port=None, tls_dir=None, https_port=None):
        self.host = host
        self.port = port
        # AMQPS (None when the broker under test has none known) and the directory holding
        # ca.pem, client-guest.pem and client-guest.key generated for it.
        self.amqps_port = amqps_port
        self.https_port = https_port
        self.tls_dir = tls_dir
        # The management API's port (None when the broker under test has none known).
        self.http_port = http_port
        self.username = username
        self.password = password
        self.vhost = vhost
        self.process = process
        self.log_path = log_path

    @property
    def url(self):
        vhost = "%2F" if self.vhost == "/" else self.vhost
        return "amqp://%s:%s@%s:%d/%s" % (self.username, self.password,
                                          self.host, self.port, vhost)

    def params(self, **overrides):
        """pika.ConnectionParameters for this broker; keyword arguments
        (username, password, virtual_host, or any ConnectionParameters
        argument) override the defaults."""
        username = overrides.pop("username", self.username)
        password = overrides.pop("password", self.password)
        kwargs = dict(
            host=self.host,
            port=self.port,
            virtual_host=self.vhost,
            credentials=pika.PlainCredentials(username, password),
            connection_attempts=1,
            socket_timeout=10,
            stack_timeout=15,
            blocked_connection_timeout=15,
        )
        kwargs.update(overrides)
        return pika.ConnectionParameters(**kwargs)

    def log_tail(self, max_chars=8000):
        if not self.log_path or not Path(self.log_path).exists():
            return "(no broker log)"
        text = Path(self.log_path).read_text(errors="replace")
        return text[-max_chars:]


def _find_binary():
    env = os.environ.get("WARREN_BIN")
    if env:
        path = Path(env)
        if not path.is_absolute():
            path = (REPO_ROOT / path).resolve()
        if not path.is_file():
            pytest.exit("WARREN_BIN=%s does not exist" % env, returncode=2)
        return path
    for profile in ("release", "debug"):
        path = REPO_ROOT / "target" / profile / "warren"
        if path.is_file():
            return path
    pytest.exit(
        "Warren binary not found: build it (cargo build --release) or set "
        "WARREN_BIN (looked in target/release/warren and target/debug/warren "
        "under %s)" % REPO_ROOT,
        returncode=2,
    )


def _make_pki(d):
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate with
    CN=guest, made with the openssl command line at test time."""
    d.mkdir(parents=True, exist_ok=True)

    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, cwd=str(d),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=warren test CA", "-keyout", "ca.key", "-out", "ca.pem")
    (d / "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, cn, ext in (("server", "localhost", "server.ext"),
                          ("client-guest", "guest", "client.ext")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=" + cn,
                "-keyout", name + ".key", "-out", name + ".csr")
        openssl("x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", name + ".pem")


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(host, port):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _broker_from_url(url):
    u = urlparse(url)
    vhost = unquote(u.path[1:]) if u.path and u.path != "/" else "/"
    http = os.environ.get("WARREN_HTTP_PORT")
    return BrokerInfo(u.hostname or "127.0.0.1", u.port or 5672,
                      unquote(u.username or "guest"),
                      unquote(u.password or "guest"), vhost or "/",
                      http_port=int(http) if http else None)


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """A running broker for the whole session (see module docstring)."""
    url = os.environ.get("WARREN_AMQP_URL")
    if url:
        yield _broker_from_url(url)
        return

    binary = _find_binary()
    workdir = tmp_path_factory.mktemp("warren")
    data_dir = workdir / "data"
    data_dir.mkdir()
    log_path = workdir / "broker.log"
    host, port, http_port = "127.0.0.1", _free_port(), _free_port()
    amqps_port, https_port = _free_port(), _free_port()
    tls_dir = workdir / "tls"
    _make_pki(tls_dir)

    cmd = [str(binary), "--amqp-listen", "%s:%d" % (host, port),
           "--data-dir", str(data_dir),
           "--http-listen", "%s:%d" % (host, http_port),
           "--prometheus-listen", "%s:%d" % (host, _free_port()),
           "--amqps-listen", "%s:%d" % (host, amqps_port),
           "--https-listen", "%s:%d" % (host, https_port),
           "--tls-cert", str(tls_dir / "server.pem"),
           "--tls-key", str(tls_dir / "server.key"),
           "--tls-ca", str(tls_dir / "ca.pem")]
    env = dict(os.environ)
    env.setdefault("RUST_BACKTRACE", "1")
    log_file = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file,
                            stderr=subprocess.STDOUT, cwd=str(workdir), env=env)
    info = BrokerInfo(host, port, process=proc, log_path=log_path,
                      http_port=http_port, amqps_port=amqps_port, tls_dir=tls_dir,
                      https_port=https_port)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                log_file.flush()
                pytest.exit(
                    "warren exited with status %s during startup (%s)\n"
                    "--- broker output ---\n%s"
                    % (proc.returncode, " ".join(cmd), info.log_tail()),
                    returncode=3,
                )
            if _port_open(host, port):
                break
            if time.monotonic() > deadline:
                log_file.flush()
                pytest.exit(
                    "warren did not accept connections on %s:%d within %.0fs "
                    "(%s)\n--- broker output ---\n%s"
                    % (host, port, STARTUP_TIMEOUT, " ".join(cmd),
                       info.log_tail()),
                    returncode=3,
                )
            time.sleep(0.05)

        yield info

        if proc.poll() is not None:
            # The broker died during the session: make that loud.
            log_file.flush()
            print("\nwarren exited during the test session with status %s\n"
                  "--- broker output ---\n%s" % (proc.returncode,
                                                  info.log_tail()))
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        log_file.close()


@pytest.fixture(scope="session")
def connection_params(broker):
    """pika.ConnectionParameters for the broker under test."""
    return broker.params()


@pytest.fixture
def connect(broker):
    """Factory: ``connect(**param_overrides)`` opens a new
    BlockingConnection; every connection it opened is closed at teardown."""
    opened = []

    def _connect(**overrides):
        c = pika.BlockingConnection(broker.params(**overrides))
        opened.append(c)
        return c

    yield _connect
    for c in opened:
        _safe_close(c)


def _safe_close(connection):
    try:
        if connection.is_open:
            connection.close()
    except Exception:  # already closed by the broker, socket gone, ...
        pass


@pytest.fixture
def conn(connect):
    """A fresh pika.BlockingConnection for this test (closed at teardown)."""
    return connect()


@pytest.fixture
def channel(conn):
    """A channel on ``conn``."""
    return conn.channel()


class Names:
    """Unique queue/exchange names for one test.

    ``names.queue("hello")`` -> ``"hello.test_foo.1.3f2a9c1b"``. Every name
    handed out is deleted (queue.delete / exchange.delete) at teardown, so
    a test run against a long-lived broker leaves nothing behind.
    """

    def __init__(self, test_name):
        self._tag = re.sub(r"[^A-Za-z0-9_.-]", "_", test_name)[:80]
        self._run = uuid.uuid4().hex[:8]
        self._counter = itertools.count(1)
        self.queues = []
        self.exchanges = []

    def _make(self, prefix):
        return "%s.%s.%d.%s" % (prefix, self._tag, next(self._counter),
                                self._run)

    def queue(self, prefix="q"):
        name = self._make(prefix)
        self.queues.append(name)
        return name

    def exchange(self, prefix="x"):
        name = self._make(prefix)
        self.exchanges.append(name)
        return name

    __call__ = queue


@pytest.fixture
def names(request, broker):
    """Helper giving unique queue/exchange names (see Names)."""
    n = Names(request.node.name)
    yield n
    if not n.queues and not n.exchanges:
        return
    try:
        c = pika.BlockingConnection(broker.params())
    except Exception:
        return
    try:
        ch = c.channel()
        for kind, items in (("queue", n.queues), ("exchange", n.exchanges)):
            for name in items:
                try:
                    if not ch.is_open:
                        ch = c.channel()
                    if kind == "queue":
                        ch.queue_delete(queue=name)
                    else:
                        ch.exchange_delete(exchange=name)
                except pika.exceptions.AMQPChannelError:
                    pass
    except Exception:
        pass
    finally:
        _safe_close(c)


_BROKER_KEY = pytest.StashKey()


@pytest.fixture(autouse=True)
def _stash_broker(request):
    """Remember the session broker (for tests that use it, directly or via
    conn/channel/names) so a failure report can show the broker's log."""
    if "broker" in request.fixturenames:
        request.config.stash[_BROKER_KEY] = request.getfixturevalue("broker")
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failure, attach the tail of the broker's log to the report."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    if "broker" not in getattr(item, "fixturenames", ()):
        return
    info = item.config.stash.get(_BROKER_KEY, None)
    if info is not None and info.log_path is not None:
        report.sections.append(("warren log (tail)", info.log_tail(4000)))
