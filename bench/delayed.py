#!/usr/bin/env python3
"""Memory held by pending delayed messages: declares an x-delayed-message exchange, publishes N
messages with x-delay of an hour or more (all pending), and reports the broker's RSS before and
after and the publish rate.

    bench/delayed.py --pid PID --url amqp://guest:guest@127.0.0.1:5690/%2f [--messages 500000] [--size 256]

Needs pika (tests/python/requirements.txt). Prints one JSON line.
"""
import argparse
import json
import time

import pika


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--url", required=True)
    ap.add_argument("--messages", type=int, default=500_000)
    ap.add_argument("--size", type=int, default=256)
    a = ap.parse_args()
    conn = pika.BlockingConnection(pika.URLParameters(a.url))
    ch = conn.channel()
    ch.exchange_declare("bench-delayed", "x-delayed-message", durable=True,
                        arguments={"x-delayed-type": "direct"})
    ch.queue_declare("bench-delayed-q", durable=True)
    ch.queue_bind("bench-delayed-q", "bench-delayed", "k")
    before = rss_kib(a.pid)
    body = b"x" * a.size
    t0 = time.time()
    for i in range(a.messages):
        ch.basic_publish("bench-delayed", "k", body, pika.BasicProperties(
            delivery_mode=2, headers={"x-delay": 3_600_000 + (i * 7919) % 3_600_000}))
    ch.confirm_delivery()  # a round trip: everything before it was processed
    rate = a.messages / (time.time() - t0)
    time.sleep(3)
    q = ch.queue_declare("bench-delayed-q", passive=True)
    print(json.dumps({
        "messages": a.messages,
        "body_bytes": a.size,
        "publish_rate": round(rate),
        "rss_before_mib": round(before / 1024, 1),
        "rss_after_mib": round(rss_kib(a.pid) / 1024, 1),
        "fired_so_far": q.method.message_count,
    }))
    conn.close()


if __name__ == "__main__":
    main()
