#!/bin/bash
# The management API's list pages with 100,000 queues, quickly: a fresh broker (BIN) gets
# 100,000 transient queues through one definitions import and a 100-byte message in every
# tenth (pika), then each request is timed 7 times with curl and the median printed.
#   bench/mgmt_pages.sh BIN PORTBASE   (uses PORTBASE..PORTBASE+2; needs python3 with pika)
# bench/mgmt_scale.py is the full version (declares over AMQP, half durable; RSS on and off).
set -eu
BIN=$1; P=$2
DEFS=$(mktemp /tmp/pb-defs.XXXX.json)
python3 -c "
import json
qs=[{'name':'q-%06d'%i,'vhost':'/','durable':False,'auto_delete':False,'arguments':{}} for i in range(100000)]
json.dump({'queues':qs},open('$DEFS','w'))"
D=$(mktemp -d /tmp/pb.XXXX)
$BIN --data-dir $D/data --amqp-listen 127.0.0.1:$P --http-listen 127.0.0.1:$((P+1)) --prometheus-listen 127.0.0.1:$((P+2)) > $D/log 2>&1 &
W=$!; sleep 1.5
A=http://127.0.0.1:$((P+1))/api
curl -s -o /dev/null -u guest:guest -X POST -H 'content-type: application/json' $A/definitions --data-binary @"$DEFS"
python3 - $P <<'PY'
import sys, pika
c=pika.BlockingConnection(pika.ConnectionParameters('127.0.0.1',int(sys.argv[1])));ch=c.channel()
for i in range(0,100000,10): ch.basic_publish('', 'q-%06d'%i, b'x'*100)
c.close()
PY
sleep 1
med(){ for i in 1 2 3 4 5 6 7; do curl -s -o /dev/null -u guest:guest -w "%{time_total}\n" "$1"; done | sort -n | sed -n 4p; }
echo "page      $(med "$A/queues?page=1&page_size=500")"
echo "filtered  $(med "$A/queues?page=1&page_size=500&name=q-01&sort=messages&sort_reverse=true")"
echo "overview  $(med "$A/overview")"
echo "perobject $(med "http://127.0.0.1:$((P+2))/metrics/per-object")"
kill $W; wait $W 2>/dev/null || true; rm -rf $D "$DEFS"
