#!/usr/bin/env python3
"""Idle cost of many queues with TTLs and expiry: declares N queues (x-message-ttl, x-expires),
puts one message with a long TTL in each (so every queue has an expiry timer armed), then
samples the broker's CPU time (utime+stime from /proc/PID/stat) over a quiet window and its RSS.

    bench/idle.py --pid PID --url amqp://guest:guest@127.0.0.1:5690/%2f [--queues 10000] [--window 30]

Needs pika (tests/python/requirements.txt). Prints one JSON line.
"""
import argparse
import json
import os
import time

import pika


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime


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
    ap.add_argument("--queues", type=int, default=10000)
    ap.add_argument("--window", type=float, default=30.0)
    a = ap.parse_args()
    conn = pika.BlockingConnection(pika.URLParameters(a.url))
    ch = conn.channel()
    t0 = time.time()
    for i in range(a.queues):
        name = f"idle-{i}"
        ch.queue_declare(name, arguments={"x-message-ttl": 3_600_000, "x-expires": 7_200_000})
        ch.basic_publish("", name, b"x", pika.BasicProperties(expiration="3000000"))
    declare_s = time.time() - t0
    conn.process_data_events(time_limit=1)
    time.sleep(2)
    c0, w0 = cpu_seconds(a.pid), time.time()
    # Keep the connection alive (heartbeats) while the broker is otherwise idle.
    end = w0 + a.window
    while time.time() < end:
        conn.process_data_events(time_limit=min(1.0, end - time.time()))
    c1, w1 = cpu_seconds(a.pid), time.time()
    print(json.dumps({
        "queues": a.queues,
        "declare_and_publish_s": round(declare_s, 2),
        "window_s": round(w1 - w0, 1),
        "broker_cpu_s": round(c1 - c0, 3),
        "broker_cpu_percent": round(100 * (c1 - c0) / (w1 - w0), 3),
        "broker_rss_mib": round(rss_kib(a.pid) / 1024, 1),
    }))
    conn.close()


if __name__ == "__main__":
    main()
