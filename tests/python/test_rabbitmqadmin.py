"""rabbitmqadmin v2 (RabbitMQ's own CLI for the management API, on the rabbitmq_http_client
crate) against the broker, unchanged: it creates a vhost, a user and permissions, a queue, an
exchange, a binding and a policy, publishes and gets a message, exports, deletes and imports
definitions, and reads what an operator reads. Each step's effect is checked through the API
or over AMQP with pika, not only the tool's exit code.

The test command (scripts/test.sh) builds the tool with `cargo install` and names it in
RABBITMQADMIN_BIN. Runs against RabbitMQ too (WARREN_AMQP_URL plus WARREN_HTTP_PORT)."""

import json
import os
import subprocess
import uuid

import pika
import pytest
import requests


@pytest.fixture
def admin(broker):
    if broker.http_port is None:
        pytest.skip("no management port known (set WARREN_HTTP_PORT)")
    binary = os.environ.get("RABBITMQADMIN_BIN")
    assert binary and os.path.exists(binary), (
        "RABBITMQADMIN_BIN must name rabbitmqadmin v2 (scripts/test.sh builds it with "
        "cargo install --locked rabbitmqadmin)")

    def run(*args, check=True):
        cmd = [binary, "--host", broker.host, "--port", str(broker.http_port),
               "--username", broker.username, "--password", broker.password,
               "--non-interactive"] + list(args)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if check:
            assert p.returncode == 0, "%s\nstdout: %s\nstderr: %s" % (
                " ".join(args), p.stdout, p.stderr)
        return p

    return run


@pytest.fixture
def api(broker):
    base = "http://%s:%d/api" % (broker.host, broker.http_port)
    s = requests.Session()
    s.auth = (broker.username, broker.password)
    return lambda method, path, **kw: s.request(method, base + path, timeout=10, **kw)


def test_rabbitmqadmin_manages_the_broker(admin, api, broker, tmp_path):
    tag = uuid.uuid4().hex[:8]
    vhost, user, q, x = "ra-" + tag, "ra-user-" + tag, "ra-q", "ra-x"

    admin("declare", "vhost", "--name", vhost)
    assert api("GET", "/vhosts/" + vhost).status_code == 200
    admin("declare", "user", "--name", user, "--password", "pw-" + tag, "--tags", "management")
    assert api("GET", "/users/" + user).json()["tags"] == ["management"]
    admin("declare", "permissions", "--vhost", vhost, "--username", user,
          "--configure", ".*", "--read", ".*", "--write", ".*")
    admin("--vhost", vhost, "declare", "queue", "--name", q, "--durable", "true",
          "--arguments", '{"x-max-length": 100}')
    admin("--vhost", vhost, "declare", "exchange", "--name", x, "--type", "direct")
    admin("--vhost", vhost, "declare", "binding", "--source", x, "--destination-type", "queue",
          "--destination", q, "--routing-key", "k")

    # What it made works over AMQP for the user it made.
    conn = pika.BlockingConnection(pika.ConnectionParameters(
        broker.host, broker.port, vhost, pika.PlainCredentials(user, "pw-" + tag)))
    ch = conn.channel()
    ch.basic_publish(x, "k", b"from pika")
    conn.close()

    p = admin("--vhost", vhost, "publish", "message", "--exchange", x, "--routing-key", "k",
              "--payload", "from rabbitmqadmin")
    assert "routed" in p.stdout
    p = admin("--vhost", vhost, "list", "queues")
    assert q in p.stdout
    queue = api("GET", "/queues/%s/%s" % (vhost, q)).json()
    assert queue["messages"] == 2
    assert queue["arguments"]["x-max-length"] == 100
    p = admin("--vhost", vhost, "get", "messages", "--queue", q, "--count", "1")
    assert "from pika" in p.stdout

    admin("--vhost", vhost, "declare", "policy", "--name", "ra-p", "--pattern", "^ra-",
          "--apply-to", "queues", "--definition", '{"max-length": 10}')
    assert api("GET", "/queues/%s/%s" % (vhost, q)).json()["policy"] == "ra-p"
    assert "ra-p" in admin("--vhost", vhost, "list", "policies").stdout

    # Operators' reads.
    assert "Warren" in admin("show", "overview").stdout
    assert vhost in admin("list", "vhosts").stdout
    assert user in admin("list", "users").stdout
    assert user in admin("list", "permissions").stdout
    assert x in admin("--vhost", vhost, "list", "exchanges").stdout
    assert "k" in admin("--vhost", vhost, "list", "bindings").stdout
    admin("list", "nodes")
    node = api("GET", "/overview").json()["node"]
    admin("show", "memory_breakdown_in_bytes", "--node", node)
    admin("auth_attempts", "stats", "--node", node)
    admin("list", "feature_flags")
    admin("list", "parameters")
    admin("declare", "user_limit", "--user", user, "--name", "max-connections", "--value", "5")
    assert "max-connections" in admin("list", "user_limits").stdout
    assert api("GET", "/user-limits/" + user).json()[0]["value"]["max-connections"] == 5
    admin("list", "connections")
    admin("list", "channels")
    admin("health_check", "local_alarms")
    admin("health_check", "cluster_wide_alarms")
    admin("health_check", "port_listener", "--port", str(broker.port))
    admin("health_check", "protocol_listener", "--protocol", "amqp")

    # Definitions out, the objects gone, definitions back in.
    defs = tmp_path / "defs.json"
    admin("definitions", "export", "--file", str(defs))
    exported = json.loads(defs.read_text())
    assert any(v["name"] == vhost for v in exported["vhosts"])
    assert any(b["source"] == x and b["vhost"] == vhost for b in exported["bindings"])
    admin("--vhost", vhost, "purge", "queue", "--name", q)
    assert api("GET", "/queues/%s/%s" % (vhost, q)).json()["messages"] == 0
    admin("--vhost", vhost, "delete", "queue", "--name", q)
    assert api("GET", "/queues/%s/%s" % (vhost, q)).status_code == 404
    admin("delete", "vhost", "--name", vhost)
    admin("delete", "user", "--name", user)
    assert api("GET", "/vhosts/" + vhost).status_code == 404
    admin("definitions", "import", "--file", str(defs))
    assert api("GET", "/queues/%s/%s" % (vhost, q)).status_code == 200
    assert api("GET", "/bindings/%s/e/%s/q/%s" % (vhost, x, q)).json()[0]["routing_key"] == "k"
    assert api("GET", "/users/" + user).status_code == 200

    # Errors reach the operator as errors.
    p = admin("--vhost", "no-such-vhost-" + tag, "declare", "queue", "--name", "q", check=False)
    assert p.returncode != 0
    admin("delete", "vhost", "--name", vhost)
    admin("delete", "user", "--name", user)
