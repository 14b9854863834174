"""AMQPS with pika: a PLAIN login over TLS with the CA the test made, and SASL EXTERNAL with a
client certificate whose CN is guest; the management API over HTTPS with the same certificate."""

import ssl
import uuid

import pika
import pytest
import requests


@pytest.fixture
def tls(broker):
    if broker.amqps_port is None:
        pytest.skip("no AMQPS port known for this broker")
    return broker


def _context(broker, client_cert=False):
    ctx = ssl.create_default_context(cafile=str(broker.tls_dir / "ca.pem"))
    if client_cert:
        ctx.load_cert_chain(str(broker.tls_dir / "client-guest.pem"),
                            str(broker.tls_dir / "client-guest.key"))
    return ctx


def test_plain_login_over_tls(tls):
    params = pika.ConnectionParameters(
        "localhost", tls.amqps_port, "/", pika.PlainCredentials("guest", "guest"),
        ssl_options=pika.SSLOptions(_context(tls), "localhost"))
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    q = "tls-" + uuid.uuid4().hex[:8]
    ch.queue_declare(q, auto_delete=True)
    ch.basic_publish("", q, b"over tls")
    method, _, body = ch.basic_get(q, auto_ack=True)
    assert body == b"over tls"
    conn.close()


def test_external_login_with_a_client_certificate(tls):
    params = pika.ConnectionParameters(
        "localhost", tls.amqps_port, "/", pika.credentials.ExternalCredentials(),
        ssl_options=pika.SSLOptions(_context(tls, client_cert=True), "localhost"))
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.queue_declare("", exclusive=True)
    conn.close()


def test_user_made_over_https_logs_in_over_amqps(tls):
    if tls.https_port is None:
        pytest.skip("no HTTPS port known for this broker")
    api = "https://localhost:%d/api" % tls.https_port
    ca = str(tls.tls_dir / "ca.pem")
    user = "tls-%s" % uuid.uuid4().hex[:8]
    r = requests.put("%s/users/%s" % (api, user), auth=("guest", "guest"), verify=ca,
                     json={"password": "s3cret", "tags": ""}, timeout=10)
    assert r.status_code == 201, r.text
    r = requests.put("%s/permissions/%%2F/%s" % (api, user), auth=("guest", "guest"), verify=ca,
                     json={"configure": ".*", "write": ".*", "read": ".*"}, timeout=10)
    assert r.status_code in (201, 204), r.text
    try:
        params = pika.ConnectionParameters(
            "localhost", tls.amqps_port, "/", pika.PlainCredentials(user, "s3cret"),
            ssl_options=pika.SSLOptions(_context(tls), "localhost"))
        conn = pika.BlockingConnection(params)
        ch = conn.channel()
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.basic_publish("", q, b"over tls")
        _, _, body = next(ch.consume(q, auto_ack=True, inactivity_timeout=5))
        assert body == b"over tls"
        conn.close()
        with pytest.raises(requests.exceptions.SSLError):
            requests.get("%s/overview" % api, auth=("guest", "guest"), timeout=10)
    finally:
        requests.delete("%s/users/%s" % (api, user), auth=("guest", "guest"), verify=ca,
                        timeout=10)
