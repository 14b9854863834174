#!/usr/bin/env python3
"""Helper for bench/run.sh (standard library only).

  report.py filled FILE.json                what a fill run put in the queue (confirmed, or sent)
  report.py check FILE.json [EXPECTED]      print MISMATCH details and exit 1 if consumed differs
                                            from what was confirmed (or from EXPECTED)
  report.py summarize RAW_DIR OUT.md        medians, the results table, gnuplot charts

RAW_DIR holds cases.tsv (id, scenario, description, metrics, args) written by run.sh, meta.txt
(key=value lines) and RAW_DIR/<case>/<broker>/run-<n>.json, one per measured run, with
fill-<n>.json beside it for cases that fill a queue first.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys

BROKERS = ("warren", "rabbitmq")

# metric name -> (label, lower is better, extractor)
def _lat(kind, pct):
    def get(s):
        lat = s.get(kind)
        return lat and lat.get(pct)
    return get


def _watched(field):
    def get(s):
        w = s.get("watched") or []
        return w[0].get(field) if w else None
    return get


def _conn(field, index=None):
    def get(s):
        c = s.get("connections")
        if not c:
            return None
        v = c.get(field)
        return v[index] if index is not None and v else v
    return get


METRICS = {
    "receive_rate": ("received msg/s", False, lambda s: s.get("receive_rate")),
    "send_rate": ("sent msg/s", False, lambda s: s.get("send_rate")),
    "confirm_rate": ("confirmed msg/s", False, lambda s: s.get("confirm_rate")),
    "consumer_p99": ("consumer p99 µs", True, _lat("consumer_latency_us", "p99")),
    "consumer_p50": ("consumer p50 µs", True, _lat("consumer_latency_us", "p50")),
    "connect_rate": ("connections/s", False, _conn("connect_rate")),
    "rss_per_conn": ("RSS bytes/connection", True, _conn("rss_per_connection_bytes", 0)),
}

# Secondary figures shown in the notes column, per metric.
NOTES = {
    "consumer_p99": [("p50", _lat("consumer_latency_us", "p50")), ("msg/s", lambda s: s.get("receive_rate"))],
    "receive_rate": [("p99 µs", _lat("consumer_latency_us", "p99"))],
    "send_rate": [("confirm p99 µs", _lat("confirm_latency_us", "p99"))],
}


def load(path):
    with open(path) as f:
        return json.load(f)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=0):
    if v is None:
        return "–"
    if isinstance(v, float) and digits:
        return f"{v:,.{digits}f}"
    return f"{v:,.0f}"


def mib(v):
    return "–" if v is None else f"{v / 1048576:,.0f} MiB"


def filled(s):
    return s.get("confirmed") or s.get("sent") or 0


def cmd_filled(path):
    print(filled(load(path)))


def cmd_check(path, expected=None):
    s = load(path)
    if expected is not None and s.get("consumed") != int(expected):
        print(f"MISMATCH in {path}: consumed {s.get('consumed')} of the {expected} filled in")
        sys.exit(1)
    if s.get("consumed_matches") is False:
        print(
            f"MISMATCH in {path}: consumed {s.get('consumed')} but expected "
            f"{s.get('expected_consumed')} (confirmed {s.get('confirmed')}, sent {s.get('sent')})"
        )
        sys.exit(1)


def read_cases(raw):
    cases = []
    with open(os.path.join(raw, "cases.tsv")) as f:
        for line in f:
            if line.strip():
                cid, scen, desc, metrics, args = line.rstrip("\n").split("\t")
                cases.append(dict(id=cid, scenario=scen, desc=desc, metrics=metrics.split(","), args=args))
    return cases


def read_meta(raw):
    meta = {}
    path = os.path.join(raw, "meta.txt")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if "=" in line:
                    k, v = line.rstrip("\n").split("=", 1)
                    meta[k] = v
    return meta


def runs(raw, case, broker, prefix="run-"):
    """(name, summary) of each measured run; prefix "fill-" gives their fill runs."""
    d = os.path.join(raw, case, broker)
    if not os.path.isdir(d):
        return []
    out = []
    for name in sorted(os.listdir(d)):
        if name.startswith(prefix) and name[len(prefix):-5].isdigit() and name.endswith(".json"):
            try:
                out.append((name, load(os.path.join(d, name))))
            except (OSError, ValueError):
                pass
    return out


def fill_mismatches(raw, case, broker):
    """Drain runs that consumed other than what their fill run put in."""
    d = os.path.join(raw, case, broker)
    out = []
    for name, s in runs(raw, case, broker):
        fill = os.path.join(d, "fill-" + name[len("run-"):])
        if os.path.exists(fill):
            want = filled(load(fill))
            if s.get("consumed") != want:
                out.append(f"- {case} on {broker} ({name}): consumed {s.get('consumed')} of the {want} filled in")
    return out


def cmd_summarize(raw, out_md):
    cases = read_cases(raw)
    meta = read_meta(raw)
    rows, details, mismatches, chart = [], [], [], []
    for c in cases:
        for b in BROKERS:
            mismatches += fill_mismatches(raw, c["id"], b)
            for name, s in runs(raw, c["id"], b):
                if s.get("consumed_matches") is False:
                    mismatches.append(
                        f"- {c['id']} on {b} ({name}): consumed {s.get('consumed')}, expected "
                        f"{s.get('expected_consumed')} (confirmed {s.get('confirmed')}, sent {s.get('sent')})"
                    )
        for metric in c["metrics"]:
            source = "run-"
            if metric.startswith("fill:"):
                source, metric = "fill-", metric[len("fill:"):]
            label, lower_better, get = METRICS[metric]
            per = {}
            for b in BROKERS:
                rs = runs(raw, c["id"], b, source)
                per[b] = dict(
                    n=len(rs),
                    value=median([get(s) for _, s in rs]),
                    values=[get(s) for _, s in rs],
                    cpu=median([_watched("cpu_us_per_msg")(s) for _, s in rs]),
                    rss=median([_watched("rss_peak_bytes")(s) for _, s in rs]),
                    client=median([s.get("client_cpu_us_per_msg") for _, s in rs]),
                    notes=[(n, median([g(s) for _, s in rs])) for n, g in NOTES.get(metric, [])],
                )
            w, r = per["warren"]["value"], per["rabbitmq"]["value"]
            ratio = (w / r) if (w is not None and r) else None
            row_id = c["id"] + ("" if len(c["metrics"]) == 1 else f" ({'fill ' if source == 'fill-' else ''}{metric})")
            if ratio is not None:
                chart.append((row_id, ratio))
            notes = []
            for b, short in (("warren", "W"), ("rabbitmq", "R")):
                bits = [f"{n} {fmt(v)}" for n, v in per[b]["notes"] if v is not None]
                if bits:
                    notes.append(f"{short}: " + ", ".join(bits))
            rows.append(
                "| {id} | {desc} | {label}{lb} | {w} | {r} | {ratio} | {wc} | {rc} | {wr} | {rr} | {notes} |".format(
                    id=row_id,
                    desc=c["desc"],
                    label=label,
                    lb=" (lower is better)" if lower_better else "",
                    w=fmt(w),
                    r=fmt(r),
                    ratio="–" if ratio is None else f"{ratio:.2f}",
                    wc=fmt(per["warren"]["cpu"], 2),
                    rc=fmt(per["rabbitmq"]["cpu"], 2),
                    wr=mib(per["warren"]["rss"]),
                    rr=mib(per["rabbitmq"]["rss"]),
                    notes="; ".join(notes),
                )
            )
            for b in BROKERS:
                p = per[b]
                details.append(
                    f"| {row_id} | {b} | {p['n']} | {', '.join(fmt(v) for v in p['values'])} | "
                    f"{fmt(p['client'], 2)} | `{c['args']}` |"
                )

    png = os.path.splitext(out_md)[0] + ".png"
    png_made = draw_ratio_chart(chart, png)
    s7_png = os.path.splitext(out_md)[0] + "-s7.png"
    s7_made = draw_series_chart(raw, cases, s7_png)

    lines = [f"# Warren vs RabbitMQ, {meta.get('date', '')}", ""]
    lines.append(
        f"Machine: {meta.get('machine', '?')}. Warren {meta.get('warren', '?')}, "
        f"RabbitMQ {meta.get('rabbitmq', '?')}, load from warren-perf on the same machine."
    )
    lines.append(
        f"Each case: one discarded warm-up, then {meta.get('runs', 3)} runs of "
        f"{meta.get('duration', '?')} s (count-based cases run to their count), a fresh broker and "
        "data directory per run; figures are medians. Broker CPU is µs of broker CPU time per "
        "message (messages = max(sent, consumed)); RSS is the broker's peak."
    )
    lines.append("")
    if mismatches:
        lines += ["## MISMATCH: consumed != confirmed", ""] + mismatches + [""]
    lines += [
        "| case | scenario | figure | Warren | RabbitMQ | Warren/RabbitMQ | Warren CPU µs/msg | RabbitMQ CPU µs/msg | Warren peak RSS | RabbitMQ peak RSS | notes |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ] + rows + [""]
    if png_made:
        lines += [f"![Warren/RabbitMQ per case]({os.path.basename(png)})", ""]
    if s7_made:
        lines += [f"![S7 backlog over time]({os.path.basename(s7_png)})", ""]
    lines += [
        "## Runs",
        "",
        "| case | broker | runs | figure per run | client CPU µs/msg (median) | warren-perf arguments |",
        "|---|---|---:|---|---:|---|",
    ] + details + [""]
    with open(out_md, "w") as f:
        f.write("\n".join(lines).rstrip("\n") + "\n")
    print(out_md)
    if mismatches:
        print("\n".join(["MISMATCH:"] + mismatches), file=sys.stderr)


def gnuplot(script):
    if not shutil.which("gnuplot"):
        print("gnuplot not found: no chart", file=sys.stderr)
        return False
    r = subprocess.run(["gnuplot"], input=script.encode(), capture_output=True)
    if r.returncode != 0:
        print(f"gnuplot failed: {r.stderr.decode(errors='replace')}", file=sys.stderr)
        return False
    return True


def draw_ratio_chart(chart, png):
    if not chart:
        return False
    data = "\n".join(f'"{cid}" {ratio:.4f}' for cid, ratio in chart)
    width = max(800, 60 * len(chart) + 200)
    script = f"""
set terminal pngcairo size {width},480 noenhanced
set output "{png}"
set title "Warren / RabbitMQ per case\\n(rates: higher is better; latency and RSS: lower is better)"
set style fill solid 0.8
set boxwidth 0.6
set yrange [0:*]
set ylabel "ratio"
set xtics rotate by -35
set grid ytics
plot $data using 0:2:xtic(1) with boxes notitle lc rgb "#3a78b5", 1 with lines lc rgb "#c03030" title "parity"
"""
    script = "$data << EOD\n" + data + "\nEOD\n" + script
    return gnuplot(script)


def draw_series_chart(raw, cases, png):
    """S7: publish rate while filling, then drain rate, and the broker's RSS, over time."""
    s7 = [c for c in cases if c["scenario"] == "S7"]
    if not s7:
        return False
    blocks, plots = [], []
    for c in s7:
        for b in BROKERS:
            fills, drains = runs(raw, c["id"], b, "fill-"), runs(raw, c["id"], b)
            if not fills or not drains:
                continue
            fill, drain = fills[0][1], drains[0][1]
            offset = fill.get("elapsed_s") or 0
            rows = []
            for p in fill.get("series") or []:
                rows.append((p["t"], p.get("sent_rate", 0), p.get("rss_bytes") or [0]))
            for p in drain.get("series") or []:
                rows.append((p["t"] + offset, p.get("received_rate", 0), p.get("rss_bytes") or [0]))
            if not rows:
                continue
            name = b
            blocks.append(
                f"${name} << EOD\n"
                + "\n".join(f"{t:.2f} {rate} {rss[0] / 1048576:.1f}" for t, rate, rss in rows)
                + "\nEOD\n"
            )
            plots.append(f'${name} using 1:2 with lines lw 2 title "{b} msg/s (publish, then drain)"')
            plots.append(f'${name} using 1:3 axes x1y2 with lines dt 2 title "{b} RSS MiB"')
    if not plots:
        return False
    script = "".join(blocks) + f"""
set terminal pngcairo size 960,540 noenhanced
set output "{png}"
set title "S7 backlog: publish then drain rate, and broker RSS (first measured run)"
set xlabel "seconds"
set ylabel "msg/s"
set y2label "RSS MiB"
set ytics nomirror
set y2tics
set yrange [0:*]
set y2range [0:*]
set grid
set key outside bottom center horizontal
plot {", ".join(plots)}
"""
    return gnuplot(script)


def main(argv):
    if len(argv) == 3 and argv[1] == "filled":
        cmd_filled(argv[2])
    elif len(argv) in (3, 4) and argv[1] == "check":
        cmd_check(*argv[2:])
    elif len(argv) >= 4 and argv[1] == "summarize":
        cmd_summarize(argv[2], argv[3])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv)
