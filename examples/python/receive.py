#!/usr/bin/env python
"""Tutorial 1, "Hello World!": print every message from the 'hello' queue."""
import os
import sys

import pika


def main():
    url = os.environ.get('AMQP_URL', 'amqp://guest:guest@localhost:5672/%2F')
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()

    channel.queue_declare(queue='hello')

    def callback(ch, method, properties, body):
        print(f" [x] Received {body.decode()}")

    channel.basic_consume(queue='hello',
                          on_message_callback=callback,
                          auto_ack=True)

    print(' [*] Waiting for messages. To exit press CTRL+C')
    channel.start_consuming()


if __name__ == '__main__':
    try:
        main()
    except KeyboardInterrupt:
        print('Interrupted')
        sys.exit(0)
