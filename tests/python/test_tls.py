"""AMQPS with pika: a PLAIN login over TLS with the CA the test made, and SASL EXTERNAL with a
client certificate whose CN is guest."""

import ssl
import uuid

import pika
import pytest


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
