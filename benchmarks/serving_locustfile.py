"""Locust users for benchmarks/serving_load.py: each sends one real user's history after another (no think time),
and after a 503 waits EIMF_LOAD_RETRY_AFTER_S (default 1 s) before the next request, as a client that honours
overload does: without it, 256 clients retrying at once turn the load test into a test of how fast the server
can say no.

Read from the environment: EIMF_LOAD_BODIES (a JSON list of request bodies, already in the server's format),
EIMF_LOAD_PATH (``/recommend`` or ``/invocations``). Besides Locust's own row for every request ("POST
recommend"), each answer is also counted under its status ("STATUS 200", "STATUS 503", "STATUS 0" for a
connection error), so that the latency of the accepted requests can be read apart from the refused ones.
"""
import json
import os
import random

import gevent
from locust import FastHttpUser, constant, events, task

BODIES = [json.dumps(b) for b in json.load(open(os.environ["EIMF_LOAD_BODIES"]))]
PATH = os.environ.get("EIMF_LOAD_PATH", "/recommend")
HEADERS = {"Content-Type": "application/json"}
RETRY_AFTER_S = float(os.environ.get("EIMF_LOAD_RETRY_AFTER_S", "1"))


class Client(FastHttpUser):
    wait_time = constant(0)
    connection_timeout = 120.0
    network_timeout = 120.0

    @task
    def recommend(self):
        with self.client.post(PATH, data=random.choice(BODIES), headers=HEADERS, name="recommend",
                              catch_response=True) as r:
            status = r.status_code or 0
            if status == 200:
                r.success()
            else:
                r.failure(f"HTTP {status}")
            events.request.fire(request_type="STATUS", name=str(status), response_time=r.request_meta["response_time"],
                                response_length=0, exception=None, context={})
        if status == 503:
            gevent.sleep(RETRY_AFTER_S)
