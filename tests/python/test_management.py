"""The management HTTP API seen from a pika application: what the API creates works over AMQP
(a user and vhost made by the API log in; a queue declared by the API takes messages), and
what the API does to a connection reaches the client (a deleted connection is closed with 320).
Runs against RabbitMQ too (WARREN_AMQP_URL plus WARREN_HTTP_PORT)."""

import time
import uuid

import pika
import pika.exceptions
import pytest
import requests


@pytest.fixture
def api(broker):
    if broker.http_port is None:
        pytest.skip("no management port known (set WARREN_HTTP_PORT)")
    base = "http://%s:%d/api" % (broker.host, broker.http_port)
    s = requests.Session()
    s.auth = (broker.username, broker.password)

    def call(method, path, **kw):
        return s.request(method, base + path, **kw)

    return call


def test_user_and_vhost_created_by_the_api_log_in(api, broker):
    vhost = "v-" + uuid.uuid4().hex[:8]
    user = "u-" + uuid.uuid4().hex[:8]
    assert api("PUT", "/vhosts/" + vhost, json={"description": "pika"}).status_code == 201
    assert api("PUT", "/vhosts/" + vhost, json={"description": "again"}).status_code == 204
    assert api("PUT", "/users/" + user,
               json={"password": "pw", "tags": "management"}).status_code == 201
    assert api("PUT", "/permissions/%s/%s" % (vhost, user),
               json={"configure": ".*", "write": ".*", "read": ".*"}).status_code == 201
    params = pika.ConnectionParameters(
        broker.host, broker.port, vhost, pika.PlainCredentials(user, "pw"))
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.queue_declare("from-pika")
    ch.basic_publish("", "from-pika", b"hello")
    deadline = time.time() + 10
    while time.time() < deadline:
        q = api("GET", "/queues/%s/from-pika" % vhost).json()
        if q.get("messages") == 1:
            break
        time.sleep(0.05)
    assert q["messages"] == 1
    conn.close()
    assert api("DELETE", "/vhosts/" + vhost).status_code == 204
    assert api("DELETE", "/users/" + user).status_code == 204
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(params)


def test_queue_declared_by_the_api_takes_messages(api, connect):
    name = "api-q-" + uuid.uuid4().hex[:8]
    r = api("PUT", "/queues/%2F/" + name,
            json={"durable": True, "arguments": {"x-max-length": 2}})
    assert r.status_code == 201
    ch = connect().channel()
    for body in (b"1", b"2", b"3"):
        ch.basic_publish("", name, body)
    deadline = time.time() + 10
    while time.time() < deadline and api("GET", "/queues/%2F/" + name).json()["messages"] != 2:
        time.sleep(0.05)
    # x-max-length 2, drop-head: the oldest went.
    method, _, body = ch.basic_get(name, auto_ack=True)
    assert body == b"2"
    assert api("DELETE", "/queues/%2F/" + name).status_code == 204


def test_a_connection_deleted_through_the_api_is_closed_with_320(api, connect):
    conn = connect(client_properties={"connection_name": "to-be-closed"})
    conn.channel()
    name = None
    deadline = time.time() + 10
    while time.time() < deadline and name is None:
        for c in api("GET", "/connections").json():
            if c.get("client_properties", {}).get("connection_name") == "to-be-closed":
                name = c["name"]
        time.sleep(0.05)
    assert name is not None
    r = api("DELETE", "/connections/" + requests.utils.quote(name, safe=""),
            headers={"X-Reason": "pika test"})
    assert r.status_code == 204
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as e:
        deadline = time.time() + 10
        while time.time() < deadline:
            conn.process_data_events(time_limit=0.1)
    assert e.value.reply_code == 320
    assert e.value.reply_text == "CONNECTION_FORCED - pika test"


def test_a_policy_ttl_expires_messages(api, connect):
    name = "pol-ttl-" + uuid.uuid4().hex[:8]
    r = api("PUT", "/policies/%2F/" + name,
            json={"pattern": "^" + name + "$", "apply-to": "queues",
                  "definition": {"message-ttl": 100}})
    assert r.status_code == 201
    ch = connect().channel()
    ch.queue_declare(name)
    ch.basic_publish("", name, b"short-lived")
    time.sleep(0.5)
    method, _, _ = ch.basic_get(name, auto_ack=True)
    assert method is None, "the policy's message-ttl expired the message"
    q = api("GET", "/queues/%2F/" + name).json()
    assert q["policy"] == name
    assert q["effective_policy_definition"] == {"message-ttl": 100}
    assert api("DELETE", "/policies/%2F/" + name).status_code == 204
    ch.queue_delete(name)
