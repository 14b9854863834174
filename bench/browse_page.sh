#!/bin/bash
# The message browser on a 1,000,000-message paged queue: a fresh broker (BIN) gets 1,000,000
# transient 1 KiB messages from warren-perf (PERF) in one queue, twice the default 512 MiB
# budget, so most of the queue is paged out to the store. Then each browse request is timed 7
# times with curl and the median printed: page 1, page 500 and page 1,000 (1,000 messages a
# page, reached directly by position: the cursor is a position), the same with 100 messages,
# and a search that scans the whole queue. Last, the whole queue is walked page by page through
# `next`, and the queue's count is checked unchanged (browsing consumes nothing).
#   bench/browse_page.sh BIN PERF PORTBASE [STORAGE_URL]   (uses PORTBASE..PORTBASE+2)
set -eu
BIN=$1; PERF=$2; P=$3; STORAGE=${4:-}
D=$(mktemp -d /tmp/bp.XXXX)
ARGS=(--data-dir "$D/data" --amqp-listen 127.0.0.1:$P --http-listen 127.0.0.1:$((P+1))
      --prometheus-listen 127.0.0.1:$((P+2)))
[ -n "$STORAGE" ] && ARGS+=(--storage "$STORAGE")
"$BIN" "${ARGS[@]}" > "$D/log" 2>&1 &
W=$!
trap 'kill $W 2>/dev/null; wait $W 2>/dev/null; rm -rf "$D"' EXIT
A=http://127.0.0.1:$((P+1))/api
for _ in $(seq 100); do curl -sf -o /dev/null -u guest:guest "$A/overview" && break; sleep 0.2; done
start=$(date +%s.%N)
"$PERF" --uri "amqp://guest:guest@127.0.0.1:$P" -x1 -y0 -s1024 -C 1000000 -u browse > "$D/perf.log" 2>&1
echo "filled 1,000,000 x 1 KiB in $(echo "$(date +%s.%N) - $start" | bc) s"
count() { curl -s -u guest:guest "$A/queues/%2F/browse" | python3 -c '
import json,sys; q=json.load(sys.stdin)
print(q["messages"], q.get("messages_paged_out", "?"), q.get("messages_ram", "?"))'; }
echo "messages, paged out, in memory: $(count)"
med() { for _ in 1 2 3 4 5 6 7; do curl -s -o /dev/null -u guest:guest -w "%{time_total}\n" "$1"; done | sort -n | sed -n 4p; }
first=$(curl -s -u guest:guest "$A/queues/%2F/browse/messages?count=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["items"][0]["position"])')
M="$A/queues/%2F/browse/messages"
echo "page 1     (1,000 messages): $(med "$M?from=$first&count=1000") s"
echo "page 500   (1,000 messages): $(med "$M?from=$((first + 499000))&count=1000") s"
echo "page 1,000 (1,000 messages): $(med "$M?from=$((first + 999000))&count=1000") s"
echo "page 10,000  (100 messages): $(med "$M?from=$((first + 999900))&count=100") s"
echo "search, whole queue, no hit: $(med "$M?q=no-such-text&field=body&scan=1000000&count=10") s"
python3 - "$M" <<'PY'
import base64, json, sys, time, urllib.request
url = sys.argv[1]
auth = "Basic " + base64.b64encode(b"guest:guest").decode()
def get(u):
    req = urllib.request.Request(u, headers={"Authorization": auth})
    return json.load(urllib.request.urlopen(req))
t = time.monotonic(); pos = None; pages = 0; seen = 0; last = 0
while True:
    page = get(url + "?count=1000" + ("" if pos is None else "&from=%d" % pos))
    pages += 1; seen += len(page["items"])
    for it in page["items"]:
        assert it["position"] > last, "positions out of order"
        last = it["position"]
    pos = page["next"]
    if pos is None:
        break
took = time.monotonic() - t
print("walk: %d pages, %d messages in %.1f s (%.1f ms a page)" % (pages, seen, took, 1000 * took / pages))
PY
echo "after browsing: $(count)"
