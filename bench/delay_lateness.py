#!/usr/bin/env python3
"""How late delayed messages fire: publishes N messages through an x-delayed-message exchange
with delays spread over [1 s, 3 s], consumes them, and reports how long after its due time
(client clock: publish time + x-delay) each arrived: p50, p99, max, and how many came early.

    bench/delay_lateness.py --url amqp://guest:guest@127.0.0.1:5690/%2f [--messages 2000]
"""
import argparse
import json
import random
import struct
import time

import pika


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--messages", type=int, default=2000)
    a = ap.parse_args()
    conn = pika.BlockingConnection(pika.URLParameters(a.url))
    ch = conn.channel()
    ch.exchange_declare("lateness", "x-delayed-message", arguments={"x-delayed-type": "direct"})
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, "lateness", "k")
    late = []

    def on_msg(c, m, p, body):
        (due,) = struct.unpack(">d", body)
        late.append((time.time() - due) * 1000)

    ch.basic_consume(q, on_msg, auto_ack=True)
    for _ in range(a.messages):
        d = random.randint(1000, 3000)
        ch.basic_publish("lateness", "k", struct.pack(">d", time.time() + d / 1000),
                         pika.BasicProperties(headers={"x-delay": d}))
    deadline = time.time() + 10
    while len(late) < a.messages and time.time() < deadline:
        conn.process_data_events(time_limit=0.1)
    late.sort()
    pct = lambda p: round(late[min(len(late) - 1, int(p * len(late)))], 1)
    print(json.dumps({
        "messages": a.messages, "received": len(late),
        "late_ms_p50": pct(0.5), "late_ms_p99": pct(0.99), "late_ms_max": round(late[-1], 1),
        "early": sum(1 for x in late if x < -1),
    }))
    conn.close()


if __name__ == "__main__":
    main()
