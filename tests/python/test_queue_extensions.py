"""RabbitMQ's queue extensions as pika sees them: TTL, queue expiry, length
limits, dead-lettering (x-death), priorities, single active consumer,
consumer priorities, direct reply-to, quorum/lazy declares, and Warren's
extensions (delivery limit on any queue, consumer timeout that cancels,
delayed messages).

The RabbitMQ-semantics tests were checked against RabbitMQ 3.10 (run with
WARREN_AMQP_URL pointing at it); the Warren extensions are marked
``warren_only`` and skipped when WARREN_AMQP_URL is set.
"""

import os
import time

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

WAIT = 5.0

warren_only = pytest.mark.skipif(
    bool(os.environ.get("WARREN_AMQP_URL")),
    reason="Warren extension, not in RabbitMQ 3.10",
)


def wait_until(predicate, timeout=WAIT, interval=0.02):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def count(conn, queue):
    ch = conn.channel()
    n = ch.queue_declare(queue=queue, passive=True).method.message_count
    ch.close()
    return n


def wait_count(conn, queue, n):
    assert wait_until(lambda: count(conn, queue) == n), (
        "queue %s holds %d, expected %d" % (queue, count(conn, queue), n))


def get(ch, queue, timeout=WAIT):
    """basic_get until a message is there (or None after the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        m, props, body = ch.basic_get(queue=queue, auto_ack=True)
        if m is not None:
            return m, props, body
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def drain(ch, queue):
    out = []
    while True:
        m, props, body = ch.basic_get(queue=queue, auto_ack=True)
        if m is None:
            return out
        out.append((props, body))


def consume_n(conn, ch, queue, n, auto_ack=True, timeout=WAIT, **kw):
    got = []

    def on_msg(c, m, props, body):
        got.append((m, props, body))

    tag = ch.basic_consume(queue=queue, on_message_callback=on_msg,
                           auto_ack=auto_ack, **kw)
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    return tag, got


def dlx_pair(ch, names, **source_args):
    """A source queue dead-lettering through the default exchange to a DLQ."""
    src, dlq = names.queue("src"), names.queue("dlq")
    ch.queue_declare(queue=dlq)
    args = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq}
    args.update(source_args)
    ch.queue_declare(queue=src, arguments=args)
    return src, dlq


# ---------------------------------------------------------------- TTL


def test_queue_ttl_expires_messages(conn, channel, names):
    q = names.queue()
    channel.queue_declare(queue=q, arguments={"x-message-ttl": 100})
    channel.basic_publish("", q, b"a")
    wait_count(conn, q, 0)
    assert channel.basic_get(queue=q, auto_ack=True)[0] is None


def test_per_message_expiration_and_the_lower_ttl_wins(conn, channel, names):
    q = names.queue()
    channel.queue_declare(queue=q, arguments={"x-message-ttl": 60000})
    channel.basic_publish("", q, b"short",
                          pika.BasicProperties(expiration="100"))
    channel.basic_publish("", q, b"long")
    assert wait_until(lambda: count(conn, q) == 1)
    _, _, body = get(channel, q)
    assert body == b"long"


def test_ttl_zero_delivers_to_a_waiting_consumer_else_drops(conn, channel, names):
    q = names.queue()
    channel.queue_declare(queue=q, arguments={"x-message-ttl": 0})
    channel.basic_publish("", q, b"dropped")
    wait_count(conn, q, 0)
    pub = conn.channel()
    got = []
    channel.basic_consume(q, lambda c, m, p, b: got.append(b), auto_ack=True)
    conn.process_data_events(time_limit=0.1)
    pub.basic_publish("", q, b"now")
    assert wait_until(lambda: conn.process_data_events(time_limit=0.05) or got)
    assert got == [b"now"]


def test_ttl_dead_letters_with_x_death(conn, channel, names):
    src, dlq = dlx_pair(channel, names, **{"x-message-ttl": 50})
    channel.basic_publish("", src, b"m", pika.BasicProperties(
        expiration="30", headers={"app": "h"}))
    r = get(channel, dlq)
    assert r is not None
    _, props, body = r
    assert body == b"m"
    assert props.expiration is None
    h = props.headers
    assert h["app"] == "h"
    (death,) = h["x-death"]
    assert death["reason"] == "expired"
    assert death["queue"] == src
    assert death["count"] == 1
    assert death["exchange"] == ""
    assert death["routing-keys"] == [src]
    assert death["original-expiration"] == "30"
    assert h["x-first-death-reason"] == "expired"
    assert h["x-first-death-queue"] == src
    assert h["x-first-death-exchange"] == ""


def test_invalid_expiration_is_refused(conn, names):
    ch = conn.channel()
    q = names.queue()
    ch.queue_declare(queue=q)
    ch.basic_publish("", q, b"x", pika.BasicProperties(expiration="10x"))
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.queue_declare(queue=q, passive=True)
    assert e.value.reply_code == 406
    assert e.value.reply_text == \
        "PRECONDITION_FAILED - invalid expiration '10x': {leftover_string,\"x\"}"


# ---------------------------------------------------------------- x-expires


def test_unused_queue_expires_and_used_one_stays(conn, channel, names):
    idle, used = names.queue("idle"), names.queue("used")
    channel.queue_declare(queue=idle, arguments={"x-expires": 200})
    channel.queue_declare(queue=used, arguments={"x-expires": 200})
    channel.basic_consume(used, lambda *a: None, auto_ack=True)

    # A passive declare renews the lease (as in RabbitMQ), so look only once, late.
    time.sleep(0.8)
    ch = conn.channel()
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.queue_declare(queue=idle, passive=True)
    assert e.value.reply_code == 404
    assert count(conn, used) == 0


# ---------------------------------------------------------------- length limits


def test_max_length_drop_head_dead_letters_the_oldest(conn, channel, names):
    src, dlq = dlx_pair(channel, names, **{"x-max-length": 2})
    for i in range(5):
        channel.basic_publish("", src, str(i).encode())
    wait_count(conn, src, 2)
    wait_count(conn, dlq, 3)
    assert [b for _, b in drain(channel, src)] == [b"3", b"4"]
    dead = drain(channel, dlq)
    assert [b for _, b in dead] == [b"0", b"1", b"2"]
    assert dead[0][0].headers["x-death"][0]["reason"] == "maxlen"


def test_max_length_bytes_counts_body_bytes(conn, channel, names):
    q = names.queue()
    channel.queue_declare(queue=q, arguments={"x-max-length-bytes": 10})
    for body in (b"aaaa", b"bbbb", b"cccc"):
        channel.basic_publish("", q, body)
    wait_count(conn, q, 2)
    assert [b for _, b in drain(channel, q)] == [b"bbbb", b"cccc"]


def test_reject_publish_nacks_the_overflow(conn, names):
    ch = conn.channel()
    q = names.queue()
    ch.queue_declare(queue=q, arguments={"x-max-length": 1,
                                         "x-overflow": "reject-publish"})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"kept")
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish("", q, b"refused")
    assert count(conn, q) == 1


def test_reject_publish_dlx_nacks_and_dead_letters(conn, names):
    ch = conn.channel()
    src, dlq = dlx_pair(ch, names, **{"x-max-length": 1,
                                      "x-overflow": "reject-publish-dlx"})
    ch.confirm_delivery()
    ch.basic_publish("", src, b"kept")
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish("", src, b"refused")
    r = get(ch, dlq)
    assert r is not None and r[2] == b"refused"
    assert r[1].headers["x-death"][0]["reason"] == "maxlen"


# ---------------------------------------------------------------- dead-lettering


def test_reject_and_nack_dead_letter_with_reason_rejected(conn, channel, names):
    src = names.queue("src")
    x = names.exchange("dlx")
    dlq = names.queue("dlq")
    channel.exchange_declare(x, "direct")
    channel.queue_declare(queue=dlq)
    channel.queue_bind(dlq, x, routing_key=src)  # the original routing key
    channel.queue_declare(queue=src, arguments={"x-dead-letter-exchange": x})
    channel.basic_publish("", src, b"r")
    channel.basic_publish("", src, b"n")
    ch = conn.channel()
    m, _, b1 = ch.basic_get(queue=src)
    ch.basic_reject(m.delivery_tag, requeue=False)
    m, _, b2 = ch.basic_get(queue=src)
    ch.basic_nack(m.delivery_tag, requeue=False)
    wait_count(conn, dlq, 2)
    dead = drain(channel, dlq)
    assert [b for _, b in dead] == [b1, b2] == [b"r", b"n"]
    for props, _ in dead:
        d = props.headers["x-death"][0]
        assert (d["reason"], d["queue"], d["routing-keys"]) == ("rejected", src, [src])


def test_x_death_counts_per_queue_and_reason_newest_first(conn, names):
    ch = conn.channel()
    work, retry = names.queue("work"), names.queue("retry")
    ch.queue_declare(queue=work, arguments={
        "x-dead-letter-exchange": "", "x-dead-letter-routing-key": retry})
    ch.queue_declare(queue=retry, arguments={
        "x-message-ttl": 20, "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": work})
    ch.basic_publish("", work, b"job")
    for round_ in (1, 2):
        r = None
        deadline = time.monotonic() + WAIT
        while r is None or r[0] is None:
            r = ch.basic_get(queue=work)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        ch.basic_reject(r[0].delivery_tag, requeue=False)
    r = get(ch, work)
    assert r is not None
    deaths = r[1].headers["x-death"]
    assert [(d["queue"], d["reason"], d["count"]) for d in deaths] == [
        (retry, "expired", 2), (work, "rejected", 2)]


def test_automatic_cycle_is_dropped(conn, channel, names):
    q = names.queue()
    # expires into itself through the default exchange, no rejection: dropped
    channel.queue_declare(queue=q, arguments={
        "x-message-ttl": 20, "x-dead-letter-exchange": ""})
    channel.basic_publish("", q, b"x")
    time.sleep(0.3)
    wait_count(conn, q, 0)


# ---------------------------------------------------------------- priorities


def test_priorities_order_and_prefetch(conn, channel, names):
    q = names.queue()
    channel.queue_declare(queue=q, arguments={"x-max-priority": 5})
    for body, prio in [(b"none", None), (b"p9", 9), (b"p2", 2), (b"p0", 0),
                       (b"p5", 5), (b"p2b", 2)]:
        channel.basic_publish("", q, body, pika.BasicProperties(priority=prio))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=1)
    got = []

    def on_msg(c, m, props, body):
        got.append(body)
        c.basic_ack(m.delivery_tag)

    ch.basic_consume(q, on_msg)
    assert wait_until(lambda: conn.process_data_events(time_limit=0.05) or len(got) == 6)
    # 9 is capped to 5 and keeps publish order with the other 5
    assert got == [b"p9", b"p5", b"p2", b"p2b", b"none", b"p0"]


def test_bad_priority_argument(channel, names):
    with pytest.raises(ChannelClosedByBroker) as e:
        channel.queue_declare(queue=names.queue(), arguments={"x-max-priority": 300})
    assert e.value.reply_code == 406
    assert e.value.reply_text.endswith("{max_value_exceeded,300}")


# ---------------------------------------------------------------- consumers


def test_single_active_consumer_hands_over(conn, channel, names):
    q = names.queue()
    channel.queue_declare(queue=q, arguments={"x-single-active-consumer": True})
    got = {"a": [], "b": []}
    ta = channel.basic_consume(q, lambda c, m, p, b: got["a"].append(b), auto_ack=True)
    channel.basic_consume(q, lambda c, m, p, b: got["b"].append(b), auto_ack=True)
    for i in range(3):
        channel.basic_publish("", q, str(i).encode())
    assert wait_until(lambda: conn.process_data_events(time_limit=0.05) or len(got["a"]) == 3)
    conn.process_data_events(time_limit=0.2)
    assert got["b"] == []
    channel.basic_cancel(ta)
    channel.basic_publish("", q, b"after")
    assert wait_until(lambda: conn.process_data_events(time_limit=0.05) or got["b"])
    assert got["b"] == [b"after"]


def test_consumer_priority_wins_while_it_has_credit(conn, names):
    ch = conn.channel()
    q = names.queue()
    ch.queue_declare(queue=q)
    ch.basic_qos(prefetch_count=2)
    got = {"low": [], "high": []}
    ch.basic_consume(q, lambda c, m, p, b: got["low"].append(b))
    ch.basic_consume(q, lambda c, m, p, b: got["high"].append(b),
                     arguments={"x-priority": 10})
    for i in range(3):
        ch.basic_publish("", q, str(i).encode())
    assert wait_until(lambda: conn.process_data_events(time_limit=0.05)
                      or len(got["low"]) + len(got["high"]) == 3)
    assert got == {"high": [b"0", b"1"], "low": [b"2"]}


@warren_only
def test_consumer_timeout_cancels_and_requeues(conn, names):
    ch = conn.channel()
    q = names.queue()
    ch.queue_declare(queue=q, arguments={"x-consumer-timeout": 200})
    ch.basic_publish("", q, b"slow")
    cancelled = []
    ch.add_on_cancel_callback(lambda frame: cancelled.append(frame))
    _, got = consume_n(conn, ch, q, 1, auto_ack=False)
    assert [b for _, _, b in got] == [b"slow"]
    assert wait_until(lambda: conn.process_data_events(time_limit=0.05) or cancelled)
    other = conn.channel()
    r = get(other, q)
    assert r is not None and r[2] == b"slow" and r[0].redelivered
    # the late ack is ignored; the channel stays open
    ch.basic_ack(got[0][0].delivery_tag)
    ch.queue_declare(queue=q, passive=True)
    assert ch.is_open


# ---------------------------------------------------------------- delivery limit


@warren_only
def test_delivery_limit_on_a_classic_queue(conn, names):
    ch = conn.channel()
    src, dlq = dlx_pair(ch, names, **{"x-delivery-limit": 1})
    ch.basic_publish("", src, b"m")
    counts = []
    for _ in range(2):
        r = None
        deadline = time.monotonic() + WAIT
        while r is None or r[0] is None:
            r = ch.basic_get(queue=src)
            assert time.monotonic() < deadline
        counts.append((r[1].headers or {}).get("x-delivery-count"))
        ch.basic_nack(r[0].delivery_tag, requeue=True)
    assert counts == [None, 1]
    r = get(ch, dlq)
    assert r is not None
    assert r[1].headers["x-death"][0]["reason"] == "delivery_limit"
    assert count(conn, src) == 0


# ---------------------------------------------------------------- direct reply-to


def test_direct_reply_to_round_trip(conn, names):
    client, server = conn.channel(), conn.channel()
    rpc = names.queue("rpc")
    server.queue_declare(queue=rpc)
    replies = []
    client.basic_consume("amq.rabbitmq.reply-to",
                         lambda c, m, p, b: replies.append((p, b)), auto_ack=True)
    client.basic_publish("", rpc, b"ping", pika.BasicProperties(
        reply_to="amq.rabbitmq.reply-to", correlation_id="42"))
    r = get(server, rpc)
    assert r is not None
    props = r[1]
    assert props.reply_to.startswith("amq.rabbitmq.reply-to.")
    server.basic_publish("", props.reply_to, b"pong",
                         pika.BasicProperties(correlation_id=props.correlation_id))
    assert wait_until(lambda: conn.process_data_events(time_limit=0.05) or replies)
    assert replies[0][1] == b"pong" and replies[0][0].correlation_id == "42"


def test_direct_reply_to_errors(connect):
    c = connect()
    ch = c.channel()
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.basic_consume("amq.rabbitmq.reply-to", lambda *a: None, auto_ack=False)
    assert e.value.reply_code == 406
    assert e.value.reply_text == "PRECONDITION_FAILED - reply consumer cannot acknowledge"
    ch = c.channel()
    ch.basic_publish("", "anything", b"x",
                     pika.BasicProperties(reply_to="amq.rabbitmq.reply-to"))
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.queue_declare(queue="", exclusive=True)
    assert e.value.reply_code == 406
    assert e.value.reply_text == "PRECONDITION_FAILED - fast reply consumer does not exist"


# ---------------------------------------------------------------- delayed messages


@warren_only
def test_delayed_messages_fire_in_due_order(conn, channel, names):
    x, q = names.exchange("delayed"), names.queue()
    channel.exchange_declare(x, "x-delayed-message",
                             arguments={"x-delayed-type": "direct"})
    channel.queue_declare(queue=q)
    channel.queue_bind(q, x, routing_key="k")
    t0 = time.monotonic()
    channel.basic_publish(x, "k", b"late", pika.BasicProperties(headers={"x-delay": 600}))
    channel.basic_publish(x, "k", b"soon", pika.BasicProperties(headers={"x-delay": 200}))
    channel.basic_publish(x, "k", b"now")
    _, got = consume_n(conn, channel, q, 3)
    elapsed = time.monotonic() - t0
    assert [b for _, _, b in got] == [b"now", b"soon", b"late"]
    assert elapsed >= 0.55


@warren_only
def test_delayed_exchange_needs_a_type(channel, names):
    with pytest.raises(ChannelClosedByBroker) as e:
        channel.exchange_declare(names.exchange(), "x-delayed-message")
    assert e.value.reply_code == 406


# ---------------------------------------------------------------- types and validation


def test_quorum_and_lazy_are_accepted(conn, channel, names):
    qq, lazy = names.queue("qq"), names.queue("lazy")
    channel.queue_declare(queue=qq, durable=True, arguments={"x-queue-type": "quorum"})
    channel.queue_declare(queue=lazy, arguments={"x-queue-mode": "lazy"})
    channel.basic_publish("", qq, b"q")
    r = get(channel, qq)
    assert r is not None and r[2] == b"q"
    channel.queue_delete(qq)


def test_non_durable_quorum_is_refused(connect, names):
    ch = connect().channel()
    q = names.queue()
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.queue_declare(queue=q, arguments={"x-queue-type": "quorum"})
    assert e.value.reply_code == 406
    assert e.value.reply_text == \
        "PRECONDITION_FAILED - invalid property 'non-durable' for queue '%s' in vhost '/'" % q


@warren_only
def test_streams_are_refused_until_they_exist(channel, names):
    with pytest.raises(ChannelClosedByBroker) as e:
        channel.queue_declare(queue=names.queue(), durable=True,
                              arguments={"x-queue-type": "stream"})
    assert e.value.reply_code == 406


def test_wrong_argument_type(channel, names):
    q = names.queue()
    with pytest.raises(ChannelClosedByBroker) as e:
        channel.queue_declare(queue=q, arguments={"x-max-length": "10"})
    assert e.value.reply_code == 406
    assert e.value.reply_text == (
        "PRECONDITION_FAILED - invalid arg 'x-max-length' for queue '%s' in "
        "vhost '/': \"expected integer, got longstr\"" % q)
