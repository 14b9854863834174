#!/usr/bin/env python3
"""The management API with many queues (issue 12, item 10).

Starts a fresh release broker per run (a new data directory each time), declares N queues over
AMQP (pika), puts a message in every tenth, then times, as medians of several requests:
  - GET /api/queues?page=1&page_size=500
  - a filtered and sorted page: name=<substring>&sort=messages&sort_reverse=true
  - GET /api/overview
  - GET /metrics/per-object (port 15692)
and reads the broker's RSS after the declares, with the management and Prometheus listeners on
and, in a second broker, off. One case is timed with curl too, as a second client.

usage: bench/mgmt_scale.py [--queues 100000] [--runs 3] [--binary target/release/warren]
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import pika
import requests


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def start(binary, http=True):
    d = tempfile.mkdtemp(prefix="warren-mgmt-bench-")
    amqp, hp, pp = free_port(), free_port(), free_port()
    args = [binary, "--data-dir", d, "--amqp-listen", f"127.0.0.1:{amqp}"]
    if http:
        args += ["--http-listen", f"127.0.0.1:{hp}", "--prometheus-listen", f"127.0.0.1:{pp}"]
    else:
        args += ["--http-listen", "", "--prometheus-listen", ""]
    env = dict(os.environ, RUST_LOG="warn")
    p = subprocess.Popen(args, env=env, stderr=subprocess.DEVNULL)
    wait_port(amqp)
    if http:
        wait_port(hp)
    return p, d, amqp, hp, pp


def declare(amqp, n):
    c = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", amqp))
    ch = c.channel()
    t0 = time.time()
    for i in range(n):
        name = f"q-{i:06d}"
        ch.queue_declare(name, durable=(i % 2 == 0))
        if i % 10 == 0:
            ch.basic_publish("", name, b"x" * 100)
    c.close()
    return time.time() - t0


def timed(url, auth, reps):
    s = requests.Session()
    times, size = [], 0
    for _ in range(reps):
        t0 = time.perf_counter()
        r = s.get(url, auth=auth)
        r.raise_for_status()
        size = len(r.content)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), size


def curl_ms(url, reps):
    times = []
    for _ in range(reps):
        out = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-u", "guest:guest", "-w", "%{time_total}", url],
            capture_output=True, text=True, check=True)
        times.append(float(out.stdout) * 1000)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--queues", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--binary", default="target/release/warren")
    a = ap.parse_args()
    auth = ("guest", "guest")
    results = {k: [] for k in ["declare_s", "page_ms", "filtered_ms", "overview_ms",
                               "per_object_ms", "page_curl_ms", "rss_mib_on", "rss_mib_off"]}
    for run in range(a.runs):
        p, d, amqp, hp, pp = start(a.binary, http=True)
        try:
            results["declare_s"].append(declare(amqp, a.queues))
            time.sleep(1)
            api = f"http://127.0.0.1:{hp}/api"
            ms, size = timed(f"{api}/queues?page=1&page_size=500", auth, a.reps)
            page = requests.get(f"{api}/queues?page=1&page_size=500", auth=auth).json()
            assert page["total_count"] == a.queues + 0, page["total_count"]
            assert page["item_count"] == 500
            results["page_ms"].append(ms)
            results["page_curl_ms"].append(curl_ms(f"{api}/queues?page=1&page_size=500", a.reps))
            ms, _ = timed(f"{api}/queues?page=1&page_size=500&name=q-01&sort=messages"
                          "&sort_reverse=true", auth, a.reps)
            results["filtered_ms"].append(ms)
            ms, _ = timed(f"{api}/overview", auth, a.reps)
            results["overview_ms"].append(ms)
            ms, size = timed(f"http://127.0.0.1:{pp}/metrics/per-object", None, max(3, a.reps // 2))
            results["per_object_ms"].append(ms)
            results["rss_mib_on"].append(rss_kib(p.pid) / 1024)
        finally:
            p.terminate()
            p.wait()
            shutil.rmtree(d, ignore_errors=True)
        p, d, amqp, _, _ = start(a.binary, http=False)
        try:
            declare(amqp, a.queues)
            time.sleep(1)
            results["rss_mib_off"].append(rss_kib(p.pid) / 1024)
        finally:
            p.terminate()
            p.wait()
            shutil.rmtree(d, ignore_errors=True)
        print(f"run {run + 1}: " + json.dumps({k: round(v[-1], 1) for k, v in results.items()}),
              file=sys.stderr)
    print(f"{a.queues} queues, {a.runs} fresh brokers, medians of {a.reps} requests each:")
    for k, v in results.items():
        print(f"  {k:16} median {statistics.median(v):9.1f}   runs {[round(x, 1) for x in v]}")


if __name__ == "__main__":
    main()
