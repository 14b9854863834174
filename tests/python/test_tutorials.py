"""RabbitMQ's six Python tutorials, as tests.

Each test keeps the shape of the official pika tutorial code (same calls,
same arguments, same callbacks); where a tutorial uses two programs, the
receiving side runs in a thread with its own BlockingConnection (pika
connections are not thread-safe, so nothing is shared between threads except
through ``add_callback_threadsafe``).

Queue and exchange names get a unique suffix (``names`` fixture) so the tests
are independent of each other and of leftovers on a long-lived broker.
"""

import threading
import time
import uuid

import pika
import pytest

WAIT = 5.0  # seconds a test waits for the deliveries it expects


class Receiver(threading.Thread):
    """A tutorial "receive" program running in a thread.

    ``setup(channel)`` does the tutorial's declarations/bindings and returns
    the queue to consume from. Deliveries are recorded in ``self.messages``
    as (routing_key, body) pairs; ``stop_after`` (a predicate over the
    messages) ends ``start_consuming`` from inside the callback.
    """

    def __init__(self, params, setup, auto_ack=True, prefetch_count=None,
                 on_message=None, stop_after=None):
        super().__init__(daemon=True)
        self.params = params
        self.setup = setup
        self.auto_ack = auto_ack
        self.prefetch_count = prefetch_count
        self.on_message = on_message
        self.stop_after = stop_after
        self.messages = []
        self.queue_name = None
        self.ready = threading.Event()
        self.done = threading.Event()
        self.error = None
        self.connection = None
        self.channel = None

    def run(self):
        try:
            self.connection = pika.BlockingConnection(self.params)
            channel = self.channel = self.connection.channel()
            self.queue_name = self.setup(channel)
            if self.prefetch_count is not None:
                channel.basic_qos(prefetch_count=self.prefetch_count)

            def callback(ch, method, properties, body):
                if self.on_message is not None:
                    self.on_message(ch, method, properties, body)
                self.messages.append((method.routing_key, body))
                if not self.auto_ack:
                    ch.basic_ack(delivery_tag=method.delivery_tag)
                if self.stop_after is not None and self.stop_after(
                        self.messages):
                    ch.stop_consuming()

            channel.basic_consume(queue=self.queue_name,
                                  on_message_callback=callback,
                                  auto_ack=self.auto_ack)
            self.ready.set()
            channel.start_consuming()
        except BaseException as e:  # reported by finish()
            self.error = e
        finally:
            self.ready.set()
            self.done.set()
            try:
                if self.connection is not None and self.connection.is_open:
                    self.connection.close()
            except Exception:
                pass

    def start_and_wait_ready(self):
        self.start()
        assert self.ready.wait(WAIT), "receiver did not start"
        if self.error is not None:
            raise self.error

    def wait_done(self, timeout=WAIT):
        """Wait for stop_after to end consuming."""
        finished = self.done.wait(timeout)
        if self.error is not None:
            raise self.error
        return finished

    def stop(self):
        """Stop consuming from another thread (the thread-safe way)."""
        if not self.done.is_set() and self.connection is not None:
            try:
                self.connection.add_callback_threadsafe(
                    self.channel.stop_consuming)
            except Exception:
                pass
        self.join(WAIT)
        if self.error is not None:
            raise self.error


@pytest.fixture
def receivers():
    """Receivers started by a test are stopped at teardown."""
    started = []
    yield started
    for r in started:
        try:
            r.stop()
        except Exception:
            pass


def start_receiver(receivers, *args, **kwargs):
    r = Receiver(*args, **kwargs)
    receivers.append(r)
    r.start_and_wait_ready()
    return r


# --------------------------------------------------------------------------
# 1. "Hello World!" -- send.py / receive.py
# --------------------------------------------------------------------------

def test_hello_world(broker, names, receivers):
    hello = names.queue("hello")

    # receive.py
    def receive_setup(channel):
        channel.queue_declare(queue=hello)
        return hello

    receiver = start_receiver(receivers, broker.params(), receive_setup,
                              auto_ack=True,
                              stop_after=lambda msgs: len(msgs) >= 1)

    # send.py
    connection = pika.BlockingConnection(broker.params())
    channel = connection.channel()
    channel.queue_declare(queue=hello)
    channel.basic_publish(exchange='', routing_key=hello, body='Hello World!')
    connection.close()

    assert receiver.wait_done(), "message not received: %r" % (
        receiver.messages,)
    assert receiver.messages == [(hello, b'Hello World!')]


def test_hello_world_send_before_receive(broker, names, receivers):
    """The tutorial also works when send.py runs first: the message waits in
    the queue for the consumer."""
    hello = names.queue("hello")

    connection = pika.BlockingConnection(broker.params())
    channel = connection.channel()
    channel.queue_declare(queue=hello)
    channel.basic_publish(exchange='', routing_key=hello, body='Hello World!')
    connection.close()

    def receive_setup(channel):
        channel.queue_declare(queue=hello)
        return hello

    receiver = start_receiver(receivers, broker.params(), receive_setup,
                              stop_after=lambda msgs: len(msgs) >= 1)
    assert receiver.wait_done()
    assert receiver.messages == [(hello, b'Hello World!')]


# --------------------------------------------------------------------------
# 2. Work queues -- new_task.py / worker.py
# --------------------------------------------------------------------------

def test_work_queues_fair_dispatch(broker, names, receivers, conn):
    task_queue = names.queue("task_queue")
    tasks = ["First message.", "Second message..", "Third message...",
             "Fourth message....", "Fifth message.....", "Sixth message."]
    processed = []  # (worker, body), appended from both worker threads
    lock = threading.Lock()

    def worker_setup(channel):
        channel.queue_declare(queue=task_queue, durable=True)
        return task_queue

    def make_worker(name, seconds_per_dot):
        def on_message(ch, method, properties, body):
            # worker.py: "time.sleep(body.count(b'.'))", scaled down; the slow
            # worker is much slower than the fast one.
            time.sleep(body.count(b'.') * seconds_per_dot)
            with lock:
                processed.append((name, body.decode()))
        return on_message

    # Two workers, prefetch_count=1 and manual acks, as in worker.py.
    slow = start_receiver(receivers, broker.params(), worker_setup,
                          auto_ack=False, prefetch_count=1,
                          on_message=make_worker("slow", 0.4))
    fast = start_receiver(receivers, broker.params(), worker_setup,
                          auto_ack=False, prefetch_count=1,
                          on_message=make_worker("fast", 0.0))

    # new_task.py, once per task.
    for message in tasks:
        connection = pika.BlockingConnection(broker.params())
        channel = connection.channel()
        channel.queue_declare(queue=task_queue, durable=True)
        channel.basic_publish(
            exchange='',
            routing_key=task_queue,
            body=message,
            properties=pika.BasicProperties(
                delivery_mode=pika.DeliveryMode.Persistent,
            ))
        connection.close()

    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        with lock:
            if len(processed) >= len(tasks):
                break
        time.sleep(0.05)

    with lock:
        got = list(processed)
    bodies = sorted(body for _, body in got)
    assert bodies == sorted(tasks), "each task processed exactly once"
    # Fair dispatch: with prefetch_count=1 the slow worker holds one
    # unacknowledged task at a time (its first one takes >= 0.4 s), so the
    # fast worker gets everything else instead of a round-robin half.
    slow_count = sum(1 for w, _ in got if w == "slow")
    assert slow_count <= 2, got
    assert len(got) - slow_count >= 4, got

    # Everything was acknowledged: nothing ready, two consumers attached.
    time.sleep(0.1)
    ok = conn.channel().queue_declare(queue=task_queue, durable=True,
                                      passive=True)
    assert ok.method.message_count == 0
    assert ok.method.consumer_count == 2


def test_work_queues_unacked_task_is_redelivered(broker, names, connect):
    """worker.py's point about acks: a worker that dies before acking does
    not lose the task -- it goes to another worker, marked redelivered."""
    task_queue = names.queue("task_queue")

    producer = connect().channel()
    producer.queue_declare(queue=task_queue, durable=True)
    producer.basic_publish(
        exchange='', routing_key=task_queue, body='Hello...',
        properties=pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent))

    # First worker receives the task but "dies" (closes) without acking.
    dying = connect()
    ch1 = dying.channel()
    ch1.basic_qos(prefetch_count=1)
    first = next(ch1.consume(task_queue, auto_ack=False,
                             inactivity_timeout=WAIT))
    assert first[0] is not None, "task not delivered to the first worker"
    assert first[0].redelivered is False
    assert first[2] == b'Hello...'
    dying.close()

    # Second worker gets it again.
    ch2 = connect().channel()
    ch2.basic_qos(prefetch_count=1)
    method, properties, body = next(ch2.consume(task_queue, auto_ack=False,
                                                inactivity_timeout=WAIT))
    assert method is not None, "task was not redelivered"
    assert body == b'Hello...'
    assert method.redelivered is True
    assert properties.delivery_mode == 2
    ch2.basic_ack(delivery_tag=method.delivery_tag)
    ch2.cancel()


# --------------------------------------------------------------------------
# 3. Publish/Subscribe -- emit_log.py / receive_logs.py
# --------------------------------------------------------------------------

def test_publish_subscribe_fanout(broker, names, receivers):
    logs = names.exchange("logs")
    server_named = []

    # receive_logs.py (twice)
    def receive_logs_setup(channel):
        channel.exchange_declare(exchange=logs, exchange_type='fanout')
        result = channel.queue_declare(queue='', exclusive=True)
        queue_name = result.method.queue
        server_named.append(queue_name)
        channel.queue_bind(exchange=logs, queue=queue_name)
        return queue_name

    r1 = start_receiver(receivers, broker.params(), receive_logs_setup,
                        stop_after=lambda msgs: len(msgs) >= 2)
    r2 = start_receiver(receivers, broker.params(), receive_logs_setup,
                        stop_after=lambda msgs: len(msgs) >= 2)

    # Server-named queues: distinct, with RabbitMQ's "amq.gen-" prefix.
    assert len(set(server_named)) == 2
    for q in server_named:
        assert q.startswith("amq.gen-"), q

    # emit_log.py
    connection = pika.BlockingConnection(broker.params())
    channel = connection.channel()
    channel.exchange_declare(exchange=logs, exchange_type='fanout')
    for message in ("info: Hello World!", "warning: second"):
        channel.basic_publish(exchange=logs, routing_key='', body=message)
    connection.close()

    for r in (r1, r2):
        assert r.wait_done(), r.messages
        assert [body for _, body in r.messages] == [b"info: Hello World!",
                                                    b"warning: second"]


def test_publish_subscribe_without_subscribers_drops(broker, names,
                                                     receivers):
    """Messages published to a fanout exchange with no queue bound are
    lost; a subscriber that binds later sees only later messages."""
    logs = names.exchange("logs")
    connection = pika.BlockingConnection(broker.params())
    channel = connection.channel()
    channel.exchange_declare(exchange=logs, exchange_type='fanout')
    channel.basic_publish(exchange=logs, routing_key='', body='lost')

    def receive_logs_setup(ch):
        ch.exchange_declare(exchange=logs, exchange_type='fanout')
        result = ch.queue_declare(queue='', exclusive=True)
        ch.queue_bind(exchange=logs, queue=result.method.queue)
        return result.method.queue

    r = start_receiver(receivers, broker.params(), receive_logs_setup,
                       stop_after=lambda msgs: len(msgs) >= 1)
    channel.basic_publish(exchange=logs, routing_key='', body='seen')
    connection.close()
    assert r.wait_done()
    assert [body for _, body in r.messages] == [b'seen']


# --------------------------------------------------------------------------
# 4. Routing -- emit_log_direct.py / receive_logs_direct.py
# --------------------------------------------------------------------------

def _end_marker(msgs):
    return bool(msgs) and msgs[-1][1] == b"END"


def test_routing_direct(broker, names, receivers):
    direct_logs = names.exchange("direct_logs")

    def receive_logs_direct(severities):
        def setup(channel):
            channel.exchange_declare(exchange=direct_logs,
                                     exchange_type='direct')
            result = channel.queue_declare(queue='', exclusive=True)
            queue_name = result.method.queue
            for severity in severities:
                channel.queue_bind(exchange=direct_logs, queue=queue_name,
                                   routing_key=severity)
            return queue_name
        return setup

    errors_only = start_receiver(receivers, broker.params(),
                                 receive_logs_direct(["error"]),
                                 stop_after=_end_marker)
    everything = start_receiver(receivers, broker.params(),
                                receive_logs_direct(["info", "warning",
                                                     "error"]),
                                stop_after=_end_marker)

    # emit_log_direct.py
    connection = pika.BlockingConnection(broker.params())
    channel = connection.channel()
    channel.exchange_declare(exchange=direct_logs, exchange_type='direct')
    for severity, message in [("info", "Hello World!"),
                              ("warning", "Careful"),
                              ("error", "Run. Run. Or it will explode."),
                              ("debug", "nobody listens to debug")]:
        channel.basic_publish(exchange=direct_logs, routing_key=severity,
                              body=message)
    # Messages from one channel to one queue keep their order, so once the
    # marker (routed to both queues) arrives, everything before it has too.
    channel.basic_publish(exchange=direct_logs, routing_key="error",
                          body="END")
    connection.close()

    assert errors_only.wait_done(), errors_only.messages
    assert everything.wait_done(), everything.messages
    assert errors_only.messages == [
        ("error", b"Run. Run. Or it will explode."), ("error", b"END")]
    assert everything.messages == [
        ("info", b"Hello World!"), ("warning", b"Careful"),
        ("error", b"Run. Run. Or it will explode."), ("error", b"END")]


# --------------------------------------------------------------------------
# 5. Topics -- emit_log_topic.py / receive_logs_topic.py
# --------------------------------------------------------------------------

def test_topics(broker, names, receivers):
    topic_logs = names.exchange("topic_logs")

    def receive_logs_topic(binding_keys):
        def setup(channel):
            channel.exchange_declare(exchange=topic_logs,
                                     exchange_type='topic')
            result = channel.queue_declare(queue='', exclusive=True)
            queue_name = result.method.queue
            for binding_key in binding_keys:
                channel.queue_bind(exchange=topic_logs, queue=queue_name,
                                   routing_key=binding_key)
            return queue_name
        return setup

    # The tutorial's two queues, plus "#" (everything) and "kern.*".
    q1 = start_receiver(receivers, broker.params(),
                        receive_logs_topic(["*.orange.*"]),
                        stop_after=_end_marker)
    q2 = start_receiver(receivers, broker.params(),
                        receive_logs_topic(["*.*.rabbit", "lazy.#"]),
                        stop_after=_end_marker)
    all_logs = start_receiver(receivers, broker.params(),
                              receive_logs_topic(["#"]),
                              stop_after=_end_marker)
    kern = start_receiver(receivers, broker.params(),
                          receive_logs_topic(["kern.*", "*.orange.end"]),
                          stop_after=_end_marker)

    routing_keys = [
        "quick.orange.rabbit",       # Q1, Q2
        "lazy.orange.elephant",      # Q1, Q2
        "quick.orange.fox",          # Q1
        "lazy.brown.fox",            # Q2
        "lazy.pink.rabbit",          # Q2 once (matches both bindings)
        "quick.brown.fox",           # nobody
        "orange",                    # nobody
        "quick.orange.male.rabbit",  # nobody
        "lazy.orange.male.rabbit",   # Q2
        "lazy",                      # Q2 ("#" matches zero words)
        "kern.critical",             # kern
        "kern.critical.disk",        # not kern.* (one word only)
    ]

    # emit_log_topic.py, once per message
    for routing_key in routing_keys + ["lazy.orange.end"]:
        connection = pika.BlockingConnection(broker.params())
        channel = connection.channel()
        channel.exchange_declare(exchange=topic_logs, exchange_type='topic')
        message = "END" if routing_key == "lazy.orange.end" else routing_key
        channel.basic_publish(exchange=topic_logs, routing_key=routing_key,
                              body=message)
        connection.close()

    for r in (q1, q2, all_logs, kern):
        assert r.wait_done(), r.messages

    def keys(r):
        return [k for k, _ in r.messages[:-1]]

    assert keys(q1) == ["quick.orange.rabbit", "lazy.orange.elephant",
                        "quick.orange.fox"]
    assert keys(q2) == ["quick.orange.rabbit", "lazy.orange.elephant",
                        "lazy.brown.fox", "lazy.pink.rabbit",
                        "lazy.orange.male.rabbit", "lazy"]
    assert keys(all_logs) == routing_keys
    assert keys(kern) == ["kern.critical"]
    for r in (q1, q2, all_logs, kern):
        assert r.messages[-1] == ("lazy.orange.end", b"END")


# --------------------------------------------------------------------------
# 6. RPC -- rpc_server.py / rpc_client.py
# --------------------------------------------------------------------------

def fib(n):
    if n == 0:
        return 0
    elif n == 1:
        return 1
    else:
        return fib(n - 1) + fib(n - 2)


class FibonacciRpcClient(object):
    """rpc_client.py's client, with a deadline instead of waiting forever."""

    def __init__(self, params, rpc_queue):
        self.rpc_queue = rpc_queue
        self.connection = pika.BlockingConnection(params)

        self.channel = self.connection.channel()

        result = self.channel.queue_declare(queue='', exclusive=True)
        self.callback_queue = result.method.queue

        self.channel.basic_consume(
            queue=self.callback_queue,
            on_message_callback=self.on_response,
            auto_ack=True)

        self.response = None
        self.corr_id = None
        self.stray = []

    def on_response(self, ch, method, props, body):
        if self.corr_id == props.correlation_id:
            self.response = body
        else:
            self.stray.append((props.correlation_id, body))

    def call(self, n, timeout=WAIT):
        self.response = None
        self.corr_id = str(uuid.uuid4())
        self.channel.basic_publish(
            exchange='',
            routing_key=self.rpc_queue,
            properties=pika.BasicProperties(
                reply_to=self.callback_queue,
                correlation_id=self.corr_id,
            ),
            body=str(n))
        deadline = time.monotonic() + timeout
        while self.response is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no RPC reply for fib(%d)" % n)
            self.connection.process_data_events(time_limit=min(remaining,
                                                               0.5))
        return int(self.response)

    def close(self):
        if self.connection.is_open:
            self.connection.close()


def test_rpc(broker, names, receivers):
    rpc_queue = names.queue("rpc_queue")
    requests_seen = []

    # rpc_server.py
    def server_setup(channel):
        channel.queue_declare(queue=rpc_queue)
        return rpc_queue

    def on_request(ch, method, props, body):
        n = int(body)
        requests_seen.append((props.reply_to, props.correlation_id))
        response = fib(n)
        ch.basic_publish(exchange='',
                         routing_key=props.reply_to,
                         properties=pika.BasicProperties(
                             correlation_id=props.correlation_id),
                         body=str(response))
        # Receiver acks after on_message when auto_ack=False, exactly like
        # rpc_server.py's ch.basic_ack(delivery_tag=method.delivery_tag).

    start_receiver(receivers, broker.params(), server_setup,
                   auto_ack=False, prefetch_count=1, on_message=on_request)

    fibonacci_rpc = FibonacciRpcClient(broker.params(), rpc_queue)
    try:
        assert fibonacci_rpc.callback_queue.startswith("amq.gen-")
        for n in (0, 1, 2, 10, 20):
            assert fibonacci_rpc.call(n) == fib(n)
        assert fibonacci_rpc.stray == []
    finally:
        fibonacci_rpc.close()

    assert len(requests_seen) == 5
    assert {reply_to for reply_to, _ in requests_seen} == {
        fibonacci_rpc.callback_queue}
    assert len({corr for _, corr in requests_seen}) == 5


def test_rpc_two_clients_get_their_own_replies(broker, names, receivers):
    rpc_queue = names.queue("rpc_queue")

    def server_setup(channel):
        channel.queue_declare(queue=rpc_queue)
        return rpc_queue

    def on_request(ch, method, props, body):
        ch.basic_publish(exchange='', routing_key=props.reply_to,
                         properties=pika.BasicProperties(
                             correlation_id=props.correlation_id),
                         body=str(fib(int(body))))

    start_receiver(receivers, broker.params(), server_setup,
                   auto_ack=False, prefetch_count=1, on_message=on_request)

    a = FibonacciRpcClient(broker.params(), rpc_queue)
    b = FibonacciRpcClient(broker.params(), rpc_queue)
    try:
        assert a.callback_queue != b.callback_queue
        for n in range(8):
            assert a.call(n) == fib(n)
            assert b.call(n + 5) == fib(n + 5)
        assert a.stray == [] and b.stray == []
    finally:
        a.close()
        b.close()
