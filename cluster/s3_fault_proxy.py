#!/usr/bin/env python3
"""An HTTP proxy in front of an S3 endpoint that fails some requests on purpose, as a busy or flaky S3 does.

    python cluster/s3_fault_proxy.py --listen 10.213.0.10:9001 --upstream http://10.213.0.10:9000 \
        --control /path/faults.json

Per request, with the rates in the control file (read again when it changes; missing file: no faults):
``{"slowdown": 0.05, "reset": 0.01}`` answers 5 % of requests with S3's own ``503 SlowDown`` error and closes
1 % of connections without an answer. Every other request goes to the upstream unchanged (its Host header
included, so signatures still match) and its answer comes back unchanged. The counts (requests, slowdowns,
resets) are written next to the control file as ``<control>.counts.json``: each injected fault is a request the
client had to retry for the job to succeed.

The local cluster (cluster/local_cluster.py) runs it on the head, and every host reaches S3 through it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
from pathlib import Path

from aiohttp import ClientSession, ClientTimeout, web

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")
#: Hop-by-hop headers, and those the proxy's own framing sets.
_SKIP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
         "proxy-authenticate", "content-length"}


class Faults:
    def __init__(self, control: Path, seed: int):
        self.control, self.rng = control, random.Random(seed)
        self.rates, self._mtime = {"slowdown": 0.0, "reset": 0.0}, None
        self.counts = {"requests": 0, "slowdowns": 0, "resets": 0}
        self.counts_file = control.with_name(control.name + ".counts.json")

    def draw(self) -> str:
        try:
            mtime = self.control.stat().st_mtime
        except FileNotFoundError:
            mtime = None
        if mtime != self._mtime:
            self._mtime = mtime
            self.rates = {"slowdown": 0.0, "reset": 0.0, **(json.loads(self.control.read_text()) if mtime else {})}
        self.counts["requests"] += 1
        x = self.rng.random()
        kind = "slowdown" if x < self.rates["slowdown"] else \
            "reset" if x < self.rates["slowdown"] + self.rates["reset"] else ""
        if kind:
            self.counts[kind + "s"] += 1
            tmp = self.counts_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.counts))
            os.replace(tmp, self.counts_file)
        return kind


def make_app(upstream: str, faults: Faults) -> web.Application:
    session: dict = {}

    async def start(app):
        session["s"] = ClientSession(timeout=ClientTimeout(total=600), auto_decompress=False)

    async def stop(app):
        await session["s"].close()

    async def proxy(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        kind = faults.draw()
        if kind == "reset":
            request.transport.abort()  # no answer at all: the client sees the connection dropped
            raise asyncio.CancelledError
        if kind == "slowdown":
            return web.Response(status=503, body=SLOWDOWN, content_type="application/xml")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP}
        async with session["s"].request(request.method, upstream + request.path_qs, headers=headers, data=body,
                                        allow_redirects=False) as up:
            data = await up.read()
            out = {k: v for k, v in up.headers.items() if k.lower() not in _SKIP | {"content-encoding"}}
            if up.headers.get("Content-Encoding"):
                out["Content-Encoding"] = up.headers["Content-Encoding"]
            if request.method == "HEAD":  # a HEAD answer carries the object's length, with no body
                resp = web.StreamResponse(status=up.status, headers=out)
                resp.content_length = int(up.headers.get("Content-Length", 0))
                await resp.prepare(request)
                return resp
            return web.Response(status=up.status, headers=out, body=data)

    app = web.Application(client_max_size=1 << 31)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", required=True, help="HOST:PORT")
    p.add_argument("--upstream", required=True, help="the S3 endpoint, http://HOST:PORT")
    p.add_argument("--control", required=True, help="JSON file with the fault rates")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    host, port = a.listen.rsplit(":", 1)
    web.run_app(make_app(a.upstream.rstrip("/"), Faults(Path(a.control), a.seed)), host=host, port=int(port),
                access_log=None, print=None)


if __name__ == "__main__":
    main()
