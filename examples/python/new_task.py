#!/usr/bin/env python
"""Tutorial 2, work queues: queue a task; each '.' in it is a second of work.

    python new_task.py A very hard task which takes two seconds..
"""
import os
import sys

import pika

url = os.environ.get('AMQP_URL', 'amqp://guest:guest@localhost:5672/%2F')
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()

# durable=True: the queue survives a broker restart ...
channel.queue_declare(queue='task_queue', durable=True)

message = ' '.join(sys.argv[1:]) or "Hello World!"
channel.basic_publish(
    exchange='',
    routing_key='task_queue',
    body=message,
    # ... and so do persistent messages in it.
    properties=pika.BasicProperties(
        delivery_mode=pika.DeliveryMode.Persistent,
    ))
print(f" [x] Sent {message}")
connection.close()
