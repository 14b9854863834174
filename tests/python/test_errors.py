"""RabbitMQ 3.x error behaviour (and a few related edge cases), as pika sees
it.

Reply codes and texts follow RabbitMQ 3.x (rabbit_channel / rabbit_amqqueue
/ rabbit_reader / rabbit_misc): the text is "<CONSTANT_NAME> - <explanation>",
and resources are rendered as "queue 'NAME' in vhost '/'".

Channel errors (4xx) close only the channel: pika raises
ChannelClosedByBroker from the synchronous call that was answered by
Channel.Close. Asynchronous methods (basic.publish, basic.ack, ...) get no
reply, so their error is detected by the next synchronous call on the same
channel (``roundtrip``). Connection errors (5xx) close the whole connection:
pika raises ConnectionClosedByBroker.
"""

import time

import pika
import pika.exceptions
import pytest
from pika.exceptions import ChannelClosedByBroker, ConnectionClosedByBroker

WAIT = 5.0


def roundtrip(channel):
    """A synchronous, side-effect free method: forces pika to process
    everything the broker sent before its reply (e.g. an asynchronous
    Channel.Close caused by an earlier basic.publish or basic.ack)."""
    try:
        channel.exchange_declare(exchange="amq.direct", passive=True)
    except pika.exceptions.ChannelWrongStateError:
        # The broker's Channel.Close was already processed by pika during an
        # earlier I/O pass; surface the broker's reason, not pika's.
        reason = getattr(channel, "_closing_reason", None)
        if isinstance(reason, ChannelClosedByBroker):
            raise reason
        raise


def wait_until(predicate, timeout=WAIT, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def queue_exists(connection, name):
    """Passive declare on a throwaway channel (an error closes that
    channel). 405 means it exists but is another connection's exclusive
    queue."""
    ch = connection.channel()
    try:
        ch.queue_declare(queue=name, passive=True)
    except ChannelClosedByBroker as e:
        if e.reply_code == 405:
            return True
        assert e.reply_code == 404, e
        return False
    ch.close()
    return True


def get_eventually(channel, queue, auto_ack=True, timeout=WAIT):
    """basic_get, retried until a message is there: a requeue (reject, nack,
    recover, channel close) is asynchronous in RabbitMQ."""
    deadline = time.monotonic() + timeout
    while True:
        result = channel.basic_get(queue=queue, auto_ack=auto_ack)
        if result[0] is not None or time.monotonic() > deadline:
            return result
        time.sleep(0.02)


def publish_confirmed(channel, queue, bodies):
    """Publish to the default exchange on a confirm-mode channel, so the
    messages are known to be enqueued when this returns."""
    for body in bodies:
        channel.basic_publish(exchange="", routing_key=queue, body=body)


@pytest.fixture
def confirmed(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    return ch


# --------------------------------------------------------------------------
# 404 NOT_FOUND
# --------------------------------------------------------------------------

def test_passive_declare_missing_queue(channel, names):
    q = names.queue()
    with pytest.raises(ChannelClosedByBroker) as e:
        channel.queue_declare(queue=q, passive=True)
    assert e.value.reply_code == 404
    assert e.value.reply_text == "NOT_FOUND - no queue '%s' in vhost '/'" % q
    assert channel.is_closed


def test_channel_error_leaves_connection_usable(conn, names):
    ch = conn.channel()
    with pytest.raises(ChannelClosedByBroker):
        ch.queue_declare(queue=names.queue(), passive=True)
    assert conn.is_open
    ch2 = conn.channel()
    ok = ch2.queue_declare(queue="", exclusive=True)
    assert ok.method.queue


def test_passive_declare_missing_exchange(channel, names):
    x = names.exchange()
    with pytest.raises(ChannelClosedByBroker) as e:
        channel.exchange_declare(exchange=x, passive=True)
    assert e.value.reply_code == 404
    assert e.value.reply_text == (
        "NOT_FOUND - no exchange '%s' in vhost '/'" % x)


def test_publish_to_missing_exchange_closes_channel(conn, names):
    channel = conn.channel()
    x = names.exchange()
    # No reply to basic.publish: this returns normally ...
    channel.basic_publish(exchange=x, routing_key="k", body=b"lost")
    # ... and the Channel.Close shows up at the next synchronous call.
    with pytest.raises(ChannelClosedByBroker) as e:
        roundtrip(channel)
    assert e.value.reply_code == 404
    assert e.value.reply_text == (
        "NOT_FOUND - no exchange '%s' in vhost '/'" % x)
    assert conn.is_open


def test_bind_to_missing_exchange(channel, names):
    q = names.queue()
    x = names.exchange()
    channel.queue_declare(queue=q)
    with pytest.raises(ChannelClosedByBroker) as e:
        channel.queue_bind(queue=q, exchange=x, routing_key="k")
    assert e.value.reply_code == 404
    assert e.value.reply_text.startswith("NOT_FOUND - no exchange '%s'" % x)


def test_consume_missing_queue(channel, names):
    q = names.queue()
    with pytest.raises(ChannelClosedByBroker) as e:
        channel.basic_consume(queue=q, on_message_callback=lambda *a: None)
    assert e.value.reply_code == 404
    assert e.value.reply_text == "NOT_FOUND - no queue '%s' in vhost '/'" % q


# --------------------------------------------------------------------------
# 406 PRECONDITION_FAILED: inequivalent redeclaration
# --------------------------------------------------------------------------

def test_queue_redeclare_different_durable(conn, names):
    q = names.queue()
    conn.channel().queue_declare(queue=q, durable=False)
    channel = conn.channel()
    with pytest.raises(ChannelClosedByBroker) as e:
        channel.queue_declare(queue=q, durable=True)
    assert e.value.reply_code == 406
    assert e.value.reply_text.startswith(
        "PRECONDITION_FAILED - inequivalent arg 'durable' for queue '%s' "
        "in vhost '/'" % q), e.value.reply_text
    # RabbitMQ's full text:
    # ...: received 'true' but current is 'false'
    assert "received 'true' but current is 'false'" in e.value.reply_text


def test_queue_redeclare_same_args_is_ok(conn, names):
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(queue=q, durable=True)
    ok = ch.queue_declare(queue=q, durable=True)
    assert ok.method.queue == q


def test_exchange_redeclare_different_type(conn, names):
    x = names.exchange()
    conn.channel().exchange_declare(exchange=x, exchange_type="direct")
    channel = conn.channel()
    with pytest.raises(ChannelClosedByBroker) as e:
        channel.exchange_declare(exchange=x, exchange_type="topic")
    assert e.value.reply_code == 406
    assert e.value.reply_text.startswith(
        "PRECONDITION_FAILED - inequivalent arg 'type' for exchange '%s' "
        "in vhost '/'" % x), e.value.reply_text


def test_passive_exchange_declare_ignores_type(conn, names):
    x = names.exchange()
    ch = conn.channel()
    ch.exchange_declare(exchange=x, exchange_type="fanout")
    # Passive declare only checks existence.
    ch.exchange_declare(exchange=x, exchange_type="topic", passive=True)


# --------------------------------------------------------------------------
# 403 ACCESS_REFUSED: reserved names
# --------------------------------------------------------------------------

def test_declare_exchange_with_amq_prefix(channel):
    with pytest.raises(ChannelClosedByBroker) as e:
        channel.exchange_declare(exchange="amq.foo", exchange_type="direct")
    assert e.value.reply_code == 403
    assert e.value.reply_text == (
        "ACCESS_REFUSED - exchange name 'amq.foo' contains reserved prefix "
        "'amq.*'")


def test_declare_queue_with_amq_prefix(channel):
    with pytest.raises(ChannelClosedByBroker) as e:
        channel.queue_declare(queue="amq.foo")
    assert e.value.reply_code == 403
    assert e.value.reply_text == (
        "ACCESS_REFUSED - queue name 'amq.foo' contains reserved prefix "
        "'amq.*'")


def test_passive_declare_of_builtin_amq_exchange_is_ok(channel):
    for x in ("amq.direct", "amq.fanout", "amq.topic", "amq.headers",
              "amq.match"):
        channel.exchange_declare(exchange=x, passive=True)


# --------------------------------------------------------------------------
# Unknown exchange type
# --------------------------------------------------------------------------

def test_unknown_exchange_type(conn, names):
    """RabbitMQ 3.13+: 406 PRECONDITION_FAILED on the channel. RabbitMQ up to
    3.12 closed the connection with 503 COMMAND_INVALID; both are accepted,
    the channel error being the current behaviour."""
    channel = conn.channel()
    x = names.exchange()
    with pytest.raises((ChannelClosedByBroker, ConnectionClosedByBroker)) as e:
        channel.exchange_declare(exchange=x, exchange_type="nonsense")
    if isinstance(e.value, ChannelClosedByBroker):
        assert e.value.reply_code == 406
        assert e.value.reply_text == (
            "PRECONDITION_FAILED - unknown exchange type 'nonsense'")
    else:
        assert e.value.reply_code == 503
        assert e.value.reply_text == (
            "COMMAND_INVALID - unknown exchange type 'nonsense'")


# --------------------------------------------------------------------------
# 405 RESOURCE_LOCKED: exclusive queues
# --------------------------------------------------------------------------

LOCKED = ("RESOURCE_LOCKED - cannot obtain exclusive access to locked "
          "queue '%s' in vhost '/'")


def test_exclusive_queue_declare_from_other_connection(connect, names):
    q = names.queue()
    owner = connect()
    owner.channel().queue_declare(queue=q, exclusive=True)
    other = connect().channel()
    with pytest.raises(ChannelClosedByBroker) as e:
        other.queue_declare(queue=q, exclusive=True)
    assert e.value.reply_code == 405
    assert e.value.reply_text.startswith(LOCKED % q), e.value.reply_text


def test_exclusive_queue_passive_declare_from_other_connection(connect,
                                                                 names):
    q = names.queue()
    connect().channel().queue_declare(queue=q, exclusive=True)
    other = connect().channel()
    with pytest.raises(ChannelClosedByBroker) as e:
        other.queue_declare(queue=q, passive=True)
    assert e.value.reply_code == 405
    assert e.value.reply_text.startswith(LOCKED % q), e.value.reply_text


def test_exclusive_queue_consume_from_other_connection(connect, names):
    q = names.queue()
    connect().channel().queue_declare(queue=q, exclusive=True)
    other = connect().channel()
    with pytest.raises(ChannelClosedByBroker) as e:
        other.basic_consume(queue=q, on_message_callback=lambda *a: None)
    assert e.value.reply_code == 405
    assert e.value.reply_text.startswith(LOCKED % q), e.value.reply_text


def test_exclusive_queue_usable_from_other_channel_same_connection(conn,
                                                                    names):
    q = names.queue()
    conn.channel().queue_declare(queue=q, exclusive=True)
    ch2 = conn.channel()
    ok = ch2.queue_declare(queue=q, passive=True)
    assert ok.method.queue == q


def test_exclusive_queue_deleted_when_connection_closes(connect, names):
    q = names.queue()
    owner = connect()
    owner.channel().queue_declare(queue=q, exclusive=True)
    observer = connect()
    assert queue_exists(observer, q)
    owner.close()
    assert wait_until(lambda: not queue_exists(observer, q)), (
        "exclusive queue survived its connection")


# --------------------------------------------------------------------------
# 406 PRECONDITION_FAILED: acks, confirm/tx mode
# --------------------------------------------------------------------------

def test_ack_unknown_delivery_tag(conn):
    channel = conn.channel()
    channel.basic_ack(delivery_tag=1)
    with pytest.raises(ChannelClosedByBroker) as e:
        roundtrip(channel)
    assert e.value.reply_code == 406
    assert e.value.reply_text == "PRECONDITION_FAILED - unknown delivery tag 1"


def test_double_ack(conn, confirmed, names):
    q = names.queue()
    confirmed.queue_declare(queue=q)
    publish_confirmed(confirmed, q, [b"m"])
    channel = conn.channel()
    method, _, _ = channel.basic_get(queue=q, auto_ack=False)
    assert method is not None
    channel.basic_ack(delivery_tag=method.delivery_tag)
    channel.basic_ack(delivery_tag=method.delivery_tag)
    with pytest.raises(ChannelClosedByBroker) as e:
        roundtrip(channel)
    assert e.value.reply_code == 406
    assert e.value.reply_text == (
        "PRECONDITION_FAILED - unknown delivery tag %d" % method.delivery_tag)


def test_confirm_then_tx_select(channel):
    channel.confirm_delivery()
    with pytest.raises(ChannelClosedByBroker) as e:
        channel.tx_select()
    assert e.value.reply_code == 406
    assert e.value.reply_text == (
        "PRECONDITION_FAILED - cannot switch from confirm to tx mode")


def test_tx_select_then_confirm(channel):
    channel.tx_select()
    with pytest.raises(ChannelClosedByBroker) as e:
        channel.confirm_delivery()
    assert e.value.reply_code == 406
    assert e.value.reply_text == (
        "PRECONDITION_FAILED - cannot switch from tx to confirm mode")


def test_tx_commit_without_select(channel):
    with pytest.raises(ChannelClosedByBroker) as e:
        channel.tx_commit()
    assert e.value.reply_code == 406
    assert e.value.reply_text == (
        "PRECONDITION_FAILED - channel is not transactional")


# --------------------------------------------------------------------------
# 540 NOT_IMPLEMENTED (connection errors)
# --------------------------------------------------------------------------

def test_basic_qos_prefetch_size_not_implemented(conn):
    channel = conn.channel()
    with pytest.raises(ConnectionClosedByBroker) as e:
        channel.basic_qos(prefetch_size=1)
    assert e.value.reply_code == 540
    assert e.value.reply_text == "NOT_IMPLEMENTED - prefetch_size!=0 (1)"
    assert conn.is_closed


def test_basic_recover_requeue_false_not_implemented(conn):
    channel = conn.channel()
    with pytest.raises(ConnectionClosedByBroker) as e:
        channel.basic_recover(requeue=False)
    assert e.value.reply_code == 540
    assert e.value.reply_text == "NOT_IMPLEMENTED - requeue=false"


# --------------------------------------------------------------------------
# Connection-level refusals
# --------------------------------------------------------------------------

def test_bad_login(broker):
    """RabbitMQ answers a failed PLAIN login with Connection.Close 403
    ACCESS_REFUSED (pika advertises authentication_failure_close); pika,
    still in the START state, reports ProbableAuthenticationError wrapping
    that close."""
    with pytest.raises((pika.exceptions.ProbableAuthenticationError,
                        pika.exceptions.AuthenticationError)) as e:
        pika.BlockingConnection(broker.params(password="definitely-wrong"))
    text = str(e.value)
    if isinstance(e.value, pika.exceptions.ProbableAuthenticationError):
        assert "403" in text, text
        assert ("ACCESS_REFUSED - Login was refused using authentication "
                "mechanism PLAIN") in text, text


def test_bad_username(broker):
    with pytest.raises((pika.exceptions.ProbableAuthenticationError,
                        pika.exceptions.AuthenticationError)) as e:
        pika.BlockingConnection(broker.params(username="nobody-like-this",
                                              password="guest"))
    if isinstance(e.value, pika.exceptions.ProbableAuthenticationError):
        assert "403" in str(e.value) and "ACCESS_REFUSED" in str(e.value)


def test_unknown_vhost(broker):
    """Connection.Open to a missing vhost: Connection.Close 530 NOT_ALLOWED
    "vhost NAME not found"; pika (still in the TUNE state) reports
    ProbableAccessDeniedError wrapping it."""
    vhost = "no-such-vhost-warren-tests"
    with pytest.raises((pika.exceptions.ProbableAccessDeniedError,
                        ConnectionClosedByBroker)) as e:
        pika.BlockingConnection(broker.params(virtual_host=vhost))
    text = str(e.value) if not isinstance(e.value, ConnectionClosedByBroker) \
        else "(%d) %s" % (e.value.reply_code, e.value.reply_text)
    assert "530" in text, text
    assert "NOT_ALLOWED - vhost %s not found" % vhost in text, text


# --------------------------------------------------------------------------
# mandatory + confirms
# --------------------------------------------------------------------------

def test_mandatory_unroutable_with_confirms_default_exchange(confirmed,
                                                             names):
    q = names.queue()  # never declared
    with pytest.raises(pika.exceptions.UnroutableError) as e:
        confirmed.basic_publish(exchange="", routing_key=q, body=b"nowhere",
                                mandatory=True)
    assert len(e.value.messages) == 1
    returned = e.value.messages[0]
    assert returned.method.reply_code == 312
    assert returned.method.reply_text == "NO_ROUTE"
    assert returned.method.exchange == ""
    assert returned.method.routing_key == q
    assert returned.body == b"nowhere"
    # The channel is still usable.
    roundtrip(confirmed)


def test_mandatory_unroutable_with_confirms_named_exchange(confirmed, names):
    x = names.exchange()
    confirmed.exchange_declare(exchange=x, exchange_type="direct")
    with pytest.raises(pika.exceptions.UnroutableError) as e:
        confirmed.basic_publish(exchange=x, routing_key="nobody",
                                body=b"nowhere", mandatory=True)
    returned = e.value.messages[0]
    assert returned.method.reply_code == 312
    assert returned.method.exchange == x
    assert returned.method.routing_key == "nobody"


def test_unroutable_without_mandatory_is_dropped_silently(confirmed, names):
    confirmed.basic_publish(exchange="", routing_key=names.queue(),
                            body=b"dropped")  # acked, not returned
    roundtrip(confirmed)


def test_publish_with_confirms_returns_normally(confirmed, names):
    q = names.queue()
    confirmed.queue_declare(queue=q)
    for i in range(5):
        assert confirmed.basic_publish(exchange="", routing_key=q,
                                       body=b"m%d" % i,
                                       mandatory=True) is None
    ok = confirmed.queue_declare(queue=q, passive=True)
    assert ok.method.message_count == 5


# --------------------------------------------------------------------------
# queue.delete if_unused / if_empty
# --------------------------------------------------------------------------

def test_queue_delete_if_unused_with_consumer(conn, names):
    q = names.queue()
    consumer = conn.channel()
    consumer.queue_declare(queue=q)
    consumer.basic_consume(queue=q, on_message_callback=lambda *a: None)
    channel = conn.channel()
    with pytest.raises(ChannelClosedByBroker) as e:
        channel.queue_delete(queue=q, if_unused=True)
    assert e.value.reply_code == 406
    assert e.value.reply_text == (
        "PRECONDITION_FAILED - queue '%s' in vhost '/' in use" % q)


def test_queue_delete_if_empty_with_messages(conn, confirmed, names):
    q = names.queue()
    confirmed.queue_declare(queue=q)
    publish_confirmed(confirmed, q, [b"a", b"b"])
    channel = conn.channel()
    with pytest.raises(ChannelClosedByBroker) as e:
        channel.queue_delete(queue=q, if_empty=True)
    assert e.value.reply_code == 406
    assert e.value.reply_text == (
        "PRECONDITION_FAILED - queue '%s' in vhost '/' not empty" % q)


def test_queue_delete_returns_message_count(confirmed, names):
    q = names.queue()
    confirmed.queue_declare(queue=q)
    publish_confirmed(confirmed, q, [b"a", b"b", b"c"])
    ok = confirmed.queue_delete(queue=q, if_unused=True, if_empty=False)
    assert ok.method.message_count == 3


# --------------------------------------------------------------------------
# Requeue, get, purge, declare-ok counts
# --------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["reject", "nack"])
def test_requeued_message_is_redelivered(conn, confirmed, names, how):
    q = names.queue()
    confirmed.queue_declare(queue=q)
    publish_confirmed(confirmed, q, [b"again"])
    channel = conn.channel()
    method, _, body = channel.basic_get(queue=q, auto_ack=False)
    assert body == b"again"
    assert method.redelivered is False
    if how == "reject":
        channel.basic_reject(delivery_tag=method.delivery_tag, requeue=True)
    else:
        channel.basic_nack(delivery_tag=method.delivery_tag, requeue=True)
    method2, _, body2 = get_eventually(channel, q)
    assert body2 == b"again"
    assert method2.redelivered is True


@pytest.mark.parametrize("how", ["reject", "nack"])
def test_reject_without_requeue_drops(conn, confirmed, names, how):
    q = names.queue()
    confirmed.queue_declare(queue=q)
    publish_confirmed(confirmed, q, [b"bye"])
    channel = conn.channel()
    method, _, _ = channel.basic_get(queue=q, auto_ack=False)
    if how == "reject":
        channel.basic_reject(delivery_tag=method.delivery_tag, requeue=False)
    else:
        channel.basic_nack(delivery_tag=method.delivery_tag, requeue=False)
    assert channel.basic_get(queue=q, auto_ack=True) == (None, None, None)


def test_nack_multiple_requeues_all(conn, confirmed, names):
    q = names.queue()
    confirmed.queue_declare(queue=q)
    publish_confirmed(confirmed, q, [b"1", b"2", b"3"])
    channel = conn.channel()
    tags = [channel.basic_get(queue=q)[0].delivery_tag for _ in range(3)]
    channel.basic_nack(delivery_tag=tags[-1], multiple=True, requeue=True)
    got = [get_eventually(channel, q) for _ in range(3)]
    assert sorted(b for _, _, b in got) == [b"1", b"2", b"3"]
    assert all(m.redelivered for m, _, _ in got)


def test_basic_get_empty_queue(channel, names):
    q = names.queue()
    channel.queue_declare(queue=q)
    assert channel.basic_get(queue=q) == (None, None, None)


def test_basic_get_message_count(confirmed, names):
    q = names.queue()
    confirmed.queue_declare(queue=q)
    publish_confirmed(confirmed, q, [b"a", b"b", b"c"])
    method, properties, body = confirmed.basic_get(queue=q, auto_ack=True)
    assert body == b"a"
    assert method.message_count == 2  # messages left after this one
    assert method.routing_key == q
    assert method.exchange == ""


def test_purge_returns_count(confirmed, names):
    q = names.queue()
    confirmed.queue_declare(queue=q)
    publish_confirmed(confirmed, q, [b"1", b"2", b"3", b"4"])
    ok = confirmed.queue_purge(queue=q)
    assert ok.method.message_count == 4
    assert confirmed.queue_purge(queue=q).method.message_count == 0
    assert confirmed.basic_get(queue=q) == (None, None, None)


def test_declare_ok_counts(connect, names):
    q = names.queue()
    c = connect()
    ch = c.channel()
    ch.confirm_delivery()
    ok = ch.queue_declare(queue=q)
    assert ok.method.queue == q
    assert ok.method.message_count == 0
    assert ok.method.consumer_count == 0

    publish_confirmed(ch, q, [b"a", b"b"])
    ok = ch.queue_declare(queue=q, passive=True)
    assert (ok.method.message_count, ok.method.consumer_count) == (2, 0)
    # A non-passive, equivalent redeclare reports the same counts.
    ok = ch.queue_declare(queue=q)
    assert (ok.method.message_count, ok.method.consumer_count) == (2, 0)

    empty = names.queue()
    ch.queue_declare(queue=empty)
    consumer_ch = connect().channel()
    consumer_ch.basic_consume(queue=empty,
                              on_message_callback=lambda *a: None)
    consumer_ch.basic_consume(queue=empty,
                              on_message_callback=lambda *a: None)
    ok = ch.queue_declare(queue=empty, passive=True)
    assert (ok.method.message_count, ok.method.consumer_count) == (0, 2)


def test_server_named_queue(channel):
    ok = channel.queue_declare(queue="", exclusive=True)
    assert ok.method.queue.startswith("amq.gen-")
    assert (ok.method.message_count, ok.method.consumer_count) == (0, 0)


# --------------------------------------------------------------------------
# Auto-delete and exclusive lifetimes
# --------------------------------------------------------------------------

def test_auto_delete_queue_deleted_when_last_consumer_cancels(connect,
                                                              names):
    q = names.queue()
    c = connect()
    ch = c.channel()
    ch.queue_declare(queue=q, auto_delete=True)
    tag1 = ch.basic_consume(queue=q, on_message_callback=lambda *a: None)
    tag2 = ch.basic_consume(queue=q, on_message_callback=lambda *a: None)
    observer = connect()

    ch.basic_cancel(tag1)
    time.sleep(0.1)
    assert queue_exists(observer, q), "deleted while a consumer remained"

    ch.basic_cancel(tag2)
    assert wait_until(lambda: not queue_exists(observer, q)), (
        "auto-delete queue survived its last consumer")


def test_auto_delete_queue_without_consumers_is_kept(connect, names):
    q = names.queue()
    c = connect()
    c.channel().queue_declare(queue=q, auto_delete=True)
    time.sleep(0.2)
    assert queue_exists(connect(), q)


def test_exclusive_server_named_queue_deleted_on_close(connect):
    owner = connect()
    q = owner.channel().queue_declare(queue="", exclusive=True).method.queue
    observer = connect()
    owner.close()
    assert wait_until(lambda: not queue_exists(observer, q))


# --------------------------------------------------------------------------
# Transactions
# --------------------------------------------------------------------------

def test_tx_rollback_drops_and_commit_delivers(conn, names):
    q = names.queue()
    tx = conn.channel()
    tx.queue_declare(queue=q)
    observer = conn.channel()

    tx.tx_select()
    tx.basic_publish(exchange="", routing_key=q, body=b"rolled back")
    # Not visible before commit.
    assert observer.queue_declare(queue=q, passive=True).method.message_count \
        == 0
    tx.tx_rollback()
    assert observer.basic_get(queue=q) == (None, None, None)

    tx.basic_publish(exchange="", routing_key=q, body=b"committed 1")
    tx.basic_publish(exchange="", routing_key=q, body=b"committed 2")
    tx.tx_commit()
    m1 = observer.basic_get(queue=q, auto_ack=True)
    m2 = observer.basic_get(queue=q, auto_ack=True)
    assert (m1[2], m2[2]) == (b"committed 1", b"committed 2")
    assert observer.basic_get(queue=q) == (None, None, None)


def test_tx_acks_are_transactional(conn, confirmed, names):
    q = names.queue()
    confirmed.queue_declare(queue=q)
    publish_confirmed(confirmed, q, [b"m"])
    tx = conn.channel()
    tx.tx_select()
    method, _, _ = tx.basic_get(queue=q, auto_ack=False)
    tx.basic_ack(delivery_tag=method.delivery_tag)
    tx.tx_rollback()
    # The rolled-back ack was discarded, so the message was not consumed:
    # once the channel holding it closes, it is back in the queue.
    tx.close()
    m, _, body = get_eventually(confirmed, q)
    assert m is not None, "message acked in a rolled-back transaction was lost"
    assert body == b"m"
    assert m.redelivered is True


# --------------------------------------------------------------------------
# basic.recover
# --------------------------------------------------------------------------

def test_basic_recover_requeues_unacked(conn, confirmed, names):
    q = names.queue()
    confirmed.queue_declare(queue=q)
    publish_confirmed(confirmed, q, [b"x", b"y"])
    channel = conn.channel()
    first, _, _ = channel.basic_get(queue=q, auto_ack=False)
    second, _, _ = channel.basic_get(queue=q, auto_ack=False)
    assert channel.basic_get(queue=q) == (None, None, None)
    channel.basic_recover(requeue=True)
    again = [get_eventually(channel, q) for _ in range(2)]
    assert sorted(b for _, _, b in again) == [b"x", b"y"]
    assert all(m.redelivered for m, _, _ in again)


def test_basic_recover_redelivers_to_consumer(conn, confirmed, names):
    q = names.queue()
    confirmed.queue_declare(queue=q)
    publish_confirmed(confirmed, q, [b"z"])
    channel = conn.channel()
    deliveries = []
    channel.basic_consume(
        queue=q, auto_ack=False,
        on_message_callback=lambda ch, m, p, b: deliveries.append((m, b)))
    assert wait_until(lambda: (conn.process_data_events(0.05)
                               or len(deliveries) >= 1))
    channel.basic_recover(requeue=True)
    assert wait_until(lambda: (conn.process_data_events(0.05)
                               or len(deliveries) >= 2))
    (m1, b1), (m2, b2) = deliveries[:2]
    assert b1 == b2 == b"z"
    assert m1.redelivered is False
    assert m2.redelivered is True
    channel.basic_ack(delivery_tag=m2.delivery_tag)


# --------------------------------------------------------------------------
# Server-initiated consumer cancel (consumer_cancel_notify)
# --------------------------------------------------------------------------

def test_consumer_cancelled_when_queue_deleted(connect, names):
    q = names.queue()
    c = connect()
    channel = c.channel()
    channel.queue_declare(queue=q)
    cancels = []
    channel.add_on_cancel_callback(lambda frame: cancels.append(frame))
    tag = channel.basic_consume(queue=q,
                                on_message_callback=lambda *a: None)

    connect().channel().queue_delete(queue=q)

    assert wait_until(lambda: (c.process_data_events(0.05)
                               or len(cancels) >= 1)), (
        "no Basic.Cancel from the broker")
    assert cancels[0].method.NAME == "Basic.Cancel"
    assert cancels[0].method.consumer_tag == tag
    c.process_data_events(0)  # let pika dispatch its own cancel event
    assert channel.is_open
    assert channel.consumer_tags == []


def test_consume_generator_ends_when_queue_deleted(connect, names):
    q = names.queue()
    c = connect()
    channel = c.channel()
    channel.queue_declare(queue=q)
    deleter = connect().channel()

    seen = []
    deleted = False
    start = time.monotonic()
    for method, properties, body in channel.consume(q, auto_ack=True,
                                                    inactivity_timeout=0.1):
        if method is not None:
            seen.append(body)
        if not deleted:
            deleter.queue_delete(queue=q)
            deleted = True
        assert time.monotonic() - start < WAIT, (
            "consume() did not end after the queue was deleted")
    # The generator ended by itself (broker's Basic.Cancel).
    assert deleted
    assert seen == []
    assert channel.is_open
