"""Fuzz the ways of serving a registered model with generated and hostile requests, and check that they survive.

    MLFLOW_TRACKING_URI=sqlite:////tmp/fuzz/home/mlflow.db \\
    python benchmarks/serving_fuzz.py --server both --requests 10000 --seed 0 --model-uri models:/eimf-ml-1m/1 \\
        --output docs/benchmarks/serving_fuzz.json

``--server``: ``ray``, ``mlflow``, ``both`` (those two), ``eimf-serve`` or ``all`` (the three).

- Ray Serve (the app of :mod:`eimf.serving.ray_serve`, deployed with ``serve.run`` on a Ray started here, so clients
  reach it through Ray's proxy): schemathesis generates positive and negative requests from the app's own
  ``/openapi.json`` and checks each answer against it (a documented status, the documented content type and body
  schema).
- ``eimf serve`` itself (a subprocess with a Ray of its own): with one replica its port is the replica's own HTTP
  server (Ray Serve's direct ingress), not the proxy, so the same schemathesis requests and hostile cases reach the
  server that faces clients in production.
- ``mlflow models serve``: hypothesis generates requests (valid and hostile field values) in every input format the
  scoring server accepts: ``dataframe_split``, ``dataframe_records``, ``inputs`` (rows and columns), ``instances``
  and CSV.
- Both get the same hostile cases: ids of every JSON type, huge and negative ``k``, duplicate keys and unknown
  fields, NaN/Infinity tokens, deep nesting, 10,000-id histories, 10 MB bodies, invalid UTF-8, missing and odd
  Content-Types, slow bodies (several sockets sending a byte at a time) and abandoned connections.

Per server it reports the requests sent, 2xx, 4xx by reason, 5xx by cause (with the smallest body that caused it
as a curl line), 503s, dropped connections, the serving processes' pids and resident memory before and after, and
whether a fixed correct request is answered identically (ids and scores) before and after.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import psutil
import requests
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

#: 5xx causes of `mlflow models serve` that lie in MLflow's scoring server, before our model sees the request:
#: cause name -> a regular expression on the exception its log shows for the 500 (its answer says only
#: "Internal Server Error"). docs/serving.md, "Faults that are MLflow's own", has a curl line for each.
MLFLOW_CAUSES = {
    "no Content-Type header": r"^AttributeError: 'NoneType' object has no attribute 'split'",
    "JSON nested too deep": r"^RecursionError: maximum recursion depth exceeded while decoding",
}
RSS_TOLERANCE = 0.10
SLOW_SOCKETS = 8
SLOW_BYTE_DELAY_S = 0.01
TEN_MB = 10 * 2 ** 20
TIMEOUT_S = 120


@dataclass
class Request:
    """One HTTP request as sent: method, path, raw body, headers (no Content-Type header when it is None)."""
    body: bytes
    content_type: Optional[str] = "application/json"
    label: str = "generated"


@dataclass
class Tally:
    server: str
    sent: int = 0
    by_status: Counter = field(default_factory=Counter)
    reasons_4xx: Counter = field(default_factory=Counter)
    #: cause -> {"count", "first_line", "repro" (the smallest body's curl line), "size"}
    causes_5xx: Dict[str, dict] = field(default_factory=dict)
    dropped: Counter = field(default_factory=Counter)
    check_failures: Counter = field(default_factory=Counter)
    check_examples: Dict[str, str] = field(default_factory=dict)
    abandoned: int = 0
    slow: Counter = field(default_factory=Counter)
    #: label (a hostile case's name, a generated body's format) -> statuses
    by_label: Dict[str, Counter] = field(default_factory=dict)
    #: answers that show a Python traceback to the client, and the smallest request that got one
    tracebacks: int = 0
    traceback_example: Optional[str] = None
    #: the server's log: a 5xx's cause is the exception it logged (and whether any eimf frame raised it)
    log_path: Optional[Path] = None
    log_offset: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def logged_exception(self) -> Tuple[Optional[str], bool]:
        """The last exception the server logged since the last call, and whether eimf's code is in its
        traceback."""
        if self.log_path is None:
            return None, False
        time.sleep(0.3)  # uvicorn logs the traceback after it has sent the 500
        with open(self.log_path, "rb") as f:
            f.seek(self.log_offset)
            new = f.read().decode("utf-8", "replace")
            self.log_offset = f.tell()
        if "Traceback" not in new:
            return None, False
        # Ray prints its workers' lines on the driver behind "(ServeReplica:eimf:Recommend pid=123) "
        new = re.sub(r"(?m)^\([\w:.-]+ pid=\d+(, ip=[\d.]+)?\) ", "", new)
        block = new[new.rindex("Traceback"):]
        last = [line for line in block.splitlines() if re.match(r"^[\w.]+(Error|Exception|Exit)\b", line)]
        return (last[0][:120] if last else None), "/eimf/" in block

    def record(self, url: str, req: Request, status: Optional[int], text: str, error: Optional[str] = None):
        with self.lock:
            self.sent += 1
            if status is None:
                self.dropped[f"{req.label}: {error or 'no answer'}"] += 1
                return
            self.by_status[status] += 1
            self.by_label.setdefault(req.label, Counter())[status] += 1
            if "Traceback (most recent call last)" in text:
                self.tracebacks += 1
                if self.traceback_example is None or len(req.body) < len(self.traceback_example):
                    self.traceback_example = curl_line(url, req)
            if 400 <= status < 500:
                self.reasons_4xx[f"{status} {normalised_reason(text)}"] += 1
            elif status >= 500 and status != 503:
                exception, in_eimf = self.logged_exception()
                cause = f"{status} {exception or first_line(text)}"
                entry = self.causes_5xx.setdefault(cause, {"count": 0, "first_line": first_line(text, 300),
                                                           "size": None, "repro": None, "label": req.label,
                                                           "exception": exception, "in_eimf": in_eimf})
                entry["count"] += 1
                if entry["size"] is None or len(req.body) < entry["size"]:
                    entry.update(size=len(req.body), repro=curl_line(url, req), label=req.label)

    @property
    def n_5xx(self) -> int:
        return sum(n for s, n in self.by_status.items() if s >= 500 and s != 503)

    def summary(self) -> dict:
        return {"server": self.server, "sent": self.sent, "by_status": dict(sorted(self.by_status.items())),
                "2xx": sum(n for s, n in self.by_status.items() if 200 <= s < 300),
                "4xx": sum(n for s, n in self.by_status.items() if 400 <= s < 500),
                "4xx_by_reason": dict(self.reasons_4xx.most_common()), "5xx": self.n_5xx,
                "503": self.by_status.get(503, 0), "causes_5xx": self.causes_5xx, "dropped": dict(self.dropped),
                "abandoned": self.abandoned, "slow": dict(self.slow),
                "by_label": {k: dict(v) for k, v in sorted(self.by_label.items())},
                "tracebacks_in_answers": self.tracebacks, "traceback_example": self.traceback_example,
                "check_failures": dict(self.check_failures), "check_examples": self.check_examples}


def first_line(text: str, limit: int = 120) -> str:
    try:  # MLflow's errors are {"error_code", "message"}; ours {"error": {"field", "reason"}}
        body = json.loads(text)
        if isinstance(body, dict) and isinstance(body.get("message"), str):
            text = body["message"]
    except ValueError:
        pass
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return (lines[0] if lines else "(empty body)")[:limit]


def normalised_reason(text: str) -> str:
    """A short reason with the request's own values (numbers, quoted text) blanked, so that equal causes count as
    one."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        field_name = body["error"].get("field") or ""
        msg = f"{field_name}: {body['error'].get('reason')}" if field_name else str(body["error"].get("reason"))
    elif isinstance(body, dict) and isinstance(body.get("message"), str):
        msg = body["message"]
        if msg.startswith(("Failed to predict data", "Failed to enforce schema")) and "Error: " in msg:
            # MLflow repeats the whole DataFrame (and the schema) before the error itself
            msg = msg[:msg.index(" data ")] + ": " + msg.rsplit("Error: ", 1)[1]
    else:
        msg = text
    msg = first_line(msg, 400)
    msg = re.sub(r"'[^']*'|\"[^\"]*\"|\([^)]*\)", "…", msg)
    msg = re.sub(r"\[\d+\]", "[i]", msg)
    msg = re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "N", msg)
    return msg[:90]


def curl_line(url: str, req: Request) -> str:
    # curl sends a form Content-Type with --data-binary unless told to send none ("Content-Type:")
    content_type = "Content-Type:" if req.content_type is None else f"Content-Type: {req.content_type}"
    header = f" -H {shlex.quote(content_type)}"
    if len(req.body) <= 600:
        try:
            text = req.body.decode("ascii")
            if text.isprintable():
                return f"curl -sS -X POST {url}{header} --data-binary {shlex.quote(text)}"
        except UnicodeDecodeError:
            pass
        data = f"<(python3 -c 'import sys; sys.stdout.buffer.write({req.body!r})')"
    else:
        data = f"@body.bin  # {len(req.body)} bytes, starting {req.body[:80]!r}"
    return f"curl -sS -X POST {url}{header} --data-binary {data}"


def send(session: requests.Session, url: str, req: Request, tally: Tally) -> Tuple[Optional[int], str]:
    headers = {} if req.content_type is None else {"Content-Type": req.content_type}
    try:
        r = session.post(url, data=req.body, headers=headers, timeout=TIMEOUT_S)
    except requests.RequestException as e:
        tally.record(url, req, None, "", type(e).__name__)
        return None, ""
    tally.record(url, req, r.status_code, r.text)
    return r.status_code, r.text


# ------------------------------------------------------------------------------------------------ generation
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-2 ** 80, max_value=2 ** 80),
                         st.floats(), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def request_strategy(known_ids: Sequence[str]):
    """A request as a Python value: mostly the right shape with hostile values here and there."""
    known = st.sampled_from(list(known_ids))
    item_id = st.one_of(known, known, known, st.text(min_size=0, max_size=12), st.integers(), json_values)
    history = st.one_of(st.lists(known, min_size=1, max_size=30), st.lists(item_id, max_size=30), json_values)
    k = st.one_of(st.integers(min_value=-3, max_value=1003), st.integers(), st.floats(), json_values,
                  st.sampled_from([1.5, 5.0, "5", True, 10 ** 30, -(10 ** 30), 2 ** 63]))
    exclude = st.one_of(st.booleans(), json_values)
    return st.one_of(
        st.fixed_dictionaries({"history": history}, optional={"k": k, "exclude_seen": exclude}),
        st.fixed_dictionaries({"history": history}, optional={"k": k, "exclude_seen": exclude,
                                                              "extra": json_values}),
        st.dictionaries(st.sampled_from(["history", "k", "exclude_seen", "user", ""]), json_values, max_size=4),
        json_values)


def _csv_cell(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else ("" if value is None else str(value))


def mlflow_body(fmt: str, rows: list) -> Request:
    """``rows`` (request values) in one of the scoring server's input formats."""
    dict_rows = [r for r in rows if isinstance(r, dict)]
    columns = list(dict.fromkeys(key for r in dict_rows for key in r)) or ["history"]
    if fmt == "dataframe_records":
        payload = {"dataframe_records": rows}
    elif fmt == "dataframe_split":
        payload = {"dataframe_split": {"columns": columns, "data": [[r.get(c) for c in columns] for r in dict_rows]}}
    elif fmt == "inputs_rows":
        payload = {"inputs": rows}
    elif fmt == "inputs_columns":
        payload = {"inputs": {c: [r.get(c) for r in dict_rows] for c in columns}}
    elif fmt == "instances":
        payload = {"instances": rows}
    elif fmt == "unwrapped":  # no format key: MLflow must refuse it
        payload = rows[0] if rows else {}
    elif fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(columns)
        for r in dict_rows:
            writer.writerow([_csv_cell(r.get(c)) for c in columns])
        return Request(out.getvalue().encode("utf-8", "surrogatepass"), "text/csv", "csv")
    else:
        raise ValueError(fmt)
    return Request(json.dumps(payload).encode("utf-8", "surrogatepass"), "application/json", fmt)


MLFLOW_FORMATS = ("dataframe_records", "dataframe_split", "inputs_rows", "inputs_columns", "instances", "csv",
                  "unwrapped")


def _run_hypothesis(strategy, n: int, seed_value: int, body: Callable) -> None:
    """Call ``body(example)`` on ``n`` examples of ``strategy``, generated only (no shrinking: nothing raises)."""
    if n <= 0:
        return

    @seed(seed_value)
    @settings(max_examples=n, phases=[Phase.generate], database=None, deadline=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(example):
        body(example)

    run()


def fuzz_mlflow_generated(url: str, known_ids: Sequence[str], n: int, seed_value: int, tally: Tally) -> None:
    session = requests.Session()
    bodies = st.tuples(st.sampled_from(MLFLOW_FORMATS), st.lists(request_strategy(known_ids), min_size=1,
                                                                   max_size=3))
    _run_hypothesis(bodies, n, seed_value, lambda fmt_rows: send(session, url, mlflow_body(*fmt_rows), tally))


def fuzz_openapi(base: str, path: str, n: int, seed_value: int, tally: Tally) -> None:
    """schemathesis: half positive, half negative requests from the app's /openapi.json; each answer is checked
    against the document (failed checks are counted by name, with one example each)."""
    import schemathesis
    from schemathesis import checks as sc

    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    operation = schema[path]["POST"]
    session = requests.Session()
    chosen = [sc.not_a_server_error, sc.status_code_conformance, sc.content_type_conformance,
              sc.response_schema_conformance, sc.response_headers_conformance, sc.negative_data_rejection]
    for i, mode in enumerate((schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)):
        def one(case):
            kwargs = case.as_transport_kwargs(base_url=base)
            body = kwargs.get("data", kwargs.get("content"))
            if body is None and "json" in kwargs:
                body = json.dumps(kwargs["json"]).encode()
            headers = {k: v for k, v in (kwargs.get("headers") or {}).items()}
            content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), None)
            req = Request(body if isinstance(body, bytes) else str(body or "").encode(), content_type,
                          f"schemathesis-{mode.value}")
            try:
                response = case.call(base_url=base, session=session, timeout=TIMEOUT_S)
            except requests.RequestException as e:
                tally.record(kwargs["url"], req, None, "", type(e).__name__)
                return
            tally.record(kwargs["url"], req, response.status_code, response.text)
            # a 413 is a documented refusal, missing from the statuses negative_data_rejection expects
            checks = chosen if response.status_code != 413 else [c for c in chosen
                                                                 if c is not sc.negative_data_rejection]
            try:
                case.validate_response(response, checks=checks)
            except (Exception, BaseExceptionGroup) as failure:  # a failed check is a finding to count, not a crash
                for f in getattr(failure, "exceptions", [failure]):
                    name = getattr(f, "title", type(f).__name__)
                    with tally.lock:
                        tally.check_failures[name] += 1
                        tally.check_examples.setdefault(name, f"{response.status_code} {req.body[:200]!r}")

        _run_hypothesis(operation.as_strategy(generation_mode=mode), n // 2 + (n % 2 if i == 0 else 0),
                        seed_value + i, one)


def hostile_requests(good: dict, wrap: Callable[[bytes], bytes], known_ids: Sequence[str]) -> List[Request]:
    """The hostile cases, each as the bytes ``wrap`` makes of one request's JSON text."""
    hist = json.dumps(good["history"])
    long_history = [known_ids[i % len(known_ids)] for i in range(10_000)]
    cases: List[Tuple[str, bytes, Optional[str]]] = []
    for value in ("null", "true", "1.5", "-1", "0", "99999999999999999999999999", "1e400", "{}", "[]", '""',
                  '"' + "x" * 300 + '"', "[1, [2, [3]]]", '{"id": 1}', "NaN", "Infinity"):
        cases.append((f"id {value[:20]}", f'{{"history": [{value}]}}'.encode(), "application/json"))
    for value in ("0", "-1", "-99999999999999999999", "1001", "99999999999999999999999999999", "1e308", "1.5",
                  "5.0", '"5"', "true", "null", "NaN", "Infinity", "-Infinity", "[5]", "{}"):
        cases.append((f"k {value[:20]}", f'{{"history": {hist}, "k": {value}}}'.encode(), "application/json"))
    cases += [
        ("duplicate history key", f'{{"history": {hist}, "history": ["no-such-id"]}}'.encode(), "application/json"),
        ("duplicate k key", f'{{"history": {hist}, "k": 5, "k": -1}}'.encode(), "application/json"),
        ("unknown field", f'{{"history": {hist}, "user_id": 7}}'.encode(), "application/json"),
        ("unknown field only", b'{"user_id": 7}', "application/json"),
        ("NaN history", b'{"history": NaN}', "application/json"),
        ("exclude_seen NaN", f'{{"history": {hist}, "exclude_seen": NaN}}'.encode(), "application/json"),
        ("deep nesting in history", b'{"history": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json"),
        ("deep nesting of objects", b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, "application/json"),
        ("10,000-id history", json.dumps({"history": long_history, "k": 10}).encode(), "application/json"),
        ("10,001-id history", json.dumps({"history": long_history + known_ids[:1]}).encode(), "application/json"),
        ("invalid UTF-8 in an id", b'{"history": ["\xff\xfe\xfd"]}', "application/json"),
        ("invalid UTF-8 body", b"\xff" * 64, "application/json"),
        ("lone surrogate escape", b'{"history": ["\\ud800"]}', "application/json"),
        ("NUL in an id", b'{"history": ["\\u0000"]}', "application/json"),
        ("empty body", b"", "application/json"),
        ("not JSON", b"{not json", "application/json"),
        ("JSON null", b"null", "application/json"),
        ("JSON list", f"[{hist}]".encode(), "application/json"),
        ("no Content-Type", json.dumps(good).encode(), None),
        ("Content-Type text/plain", json.dumps(good).encode(), "text/plain"),
        ("Content-Type application/xml", json.dumps(good).encode(), "application/xml"),
        ("Content-Type latin-1 charset", json.dumps(good).encode(), "application/json; charset=latin-1"),
        ("Content-Type odd parameter", json.dumps(good).encode(), "application/json; boundary=x"),
        ("Content-Type empty", json.dumps(good).encode(), ""),
        ("Content-Type garbage", json.dumps(good).encode(), ";;;=="),
        ("Content-Type multipart", json.dumps(good).encode(), "multipart/form-data; boundary=x"),
    ]
    out = [Request(wrap(body) if ctype == "application/json" and body else body, ctype, name)
           for name, body, ctype in cases]
    out += [Request(b"{" * TEN_MB, "application/json", "10 MB of '{'"),
            Request(wrap(json.dumps({"history": ["1"] * (TEN_MB // 5)}).encode()), "application/json",
                    "10 MB of valid JSON"),
            Request(b"\xff" * TEN_MB, "application/json", "10 MB of invalid UTF-8")]
    return out


def _status_of(raw: bytes) -> Optional[int]:
    match = re.match(rb"HTTP/1\.[01] (\d{3})", raw)
    return int(match.group(1)) if match else None


def slow_and_abandoned(host: str, port: int, path: str, body: bytes, tally: Tally, url: str) -> None:
    """Slowloris: several sockets at once send a whole request a byte at a time; then abandoned connections: half a
    request (half the headers, or the headers and half the body) and close."""
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    whole = head + body

    def slowloris(_):
        try:
            with socket.create_connection((host, port), timeout=TIMEOUT_S) as s:
                for i in range(len(whole)):
                    s.sendall(whole[i:i + 1])
                    time.sleep(SLOW_BYTE_DELAY_S)
                answer = b""
                while chunk := s.recv(65536):
                    answer += chunk
        except OSError as e:
            tally.record(url, Request(body, label="slowloris"), None, "", f"slowloris {type(e).__name__}")
            return
        status = _status_of(answer)
        tally.record(url, Request(body, label="slowloris"), status, answer.split(b"\r\n\r\n", 1)[-1].decode(
            "utf-8", "replace"), None if status else "slowloris: no HTTP answer")
        with tally.lock:
            tally.slow[str(status)] += 1

    with ThreadPoolExecutor(SLOW_SOCKETS) as pool:
        list(pool.map(slowloris, range(SLOW_SOCKETS)))
    for cut in (len(head) // 2, len(head) + len(body) // 2, len(head)):
        for _ in range(SLOW_SOCKETS):
            with socket.create_connection((host, port), timeout=10) as s:
                s.sendall(whole[:cut])
            with tally.lock:
                tally.abandoned += 1
                tally.sent += 1


# ------------------------------------------------------------------------------------------------ processes
def ray_serving_pids(app_name: str = "eimf", root: Optional[int] = None) -> Dict[str, int]:
    """The Serve replica and proxy actors of the Ray started by ``root`` (default: this process): its
    descendants."""
    out = {}
    for p in psutil.Process(root).children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        # the title names the method running at the moment (ray::ProxyActor.receive_asgi_messages): not the actor
        match = re.match(rf"ray::(ServeReplica:{app_name}:\w+|ProxyActor)", title)
        if match:
            out[match.group(1)] = p.pid
    return out


def rss_mb(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return round(total / 2 ** 20, 1)


def tree_pids(root: int) -> Dict[str, int]:
    proc = psutil.Process(root)
    return {f"{p.name()}[{i}]": p.pid for i, p in enumerate([proc] + proc.children(recursive=True))}


# ------------------------------------------------------------------------------------------------ one server
def fuzz_server(server: str, base: str, path: str, good: dict, known_ids: Sequence[str], n: int, seed_value: int,
                pids: Callable[[], Dict[str, int]], answer_of: Callable[[str], dict],
                wrap: Callable[[bytes], bytes], log_path: Optional[Path] = None) -> dict:
    """Send ``n`` requests to ``base + path`` and return the numbers and checks for the server. RSS is compared
    between the end of the first pass over the hostile cases and the end of the run (``rss_mb_start``: after the
    first correct request)."""
    url = base + path
    tally = Tally(server, log_path=log_path)
    tally.log_offset = log_path.stat().st_size if log_path is not None else 0
    session = requests.Session()
    good_request = Request(wrap(json.dumps(good).encode()), "application/json", "good")

    def answer() -> dict:
        r = session.post(url, data=good_request.body, headers={"Content-Type": "application/json"},
                         timeout=TIMEOUT_S)
        r.raise_for_status()
        return answer_of(r.text)

    before_answer = answer()
    before_pids = pids()
    start_rss = rss_mb(before_pids.values())
    t0 = time.monotonic()

    rounds = max(1, n // 2500)  # the hostile list again every 2,500 requests: a leak would show in RSS
    hostile = hostile_requests(good, wrap, known_ids)
    for i in range(rounds):
        for req in hostile:
            send(session, url, req, tally)
        if i == 0:
            # the first 10 MB bodies raise the allocators' high-water mark once; a leak grows past it
            before_rss = rss_mb(before_pids.values())
    host, port = base.split("//", 1)[1].split(":")
    slow_and_abandoned(host, int(port), path, good_request.body, tally, url)
    assert answer() == before_answer, "a correct request changed its answer during the slow/abandoned sockets"
    left = max(0, n - tally.sent)
    if server != "mlflow":  # Ray Serve's app, through the proxy or on the replica's own server
        fuzz_openapi(base, path, left, seed_value, tally)
    else:
        fuzz_mlflow_generated(url, known_ids, left, seed_value, tally)

    time.sleep(1)  # let abandoned sockets' handlers finish before the processes are compared
    after_answer = answer()
    after_pids = pids()
    after_rss = rss_mb(after_pids.values())
    out = tally.summary()
    out.update(seconds=round(time.monotonic() - t0, 1), pids_before=before_pids, pids_after=after_pids,
               crashed_or_restarted=sorted(set(before_pids.items()) ^ set(after_pids.items())),
               rss_mb_start=start_rss, rss_mb_before=before_rss, rss_mb_after=after_rss,
               rss_within_tolerance=abs(after_rss - before_rss) <= RSS_TOLERANCE * before_rss,
               same_answer=after_answer == before_answer, url=url,
               mlflow_side_5xx={cause: mlflow_cause(cause, entry) for cause, entry in tally.causes_5xx.items()}
               if server == "mlflow" else {})
    return out


def mlflow_cause(cause: str, entry: dict) -> Optional[str]:
    """The name of a documented MLflow-side 5xx cause (its exception, raised with no eimf code on the stack), or
    None."""
    if entry.get("in_eimf") or not entry.get("exception"):
        return None
    return next((name for name, pattern in MLFLOW_CAUSES.items() if re.search(pattern, entry["exception"])), None)


def ray_answer(text: str) -> dict:
    body = json.loads(text)
    return {"items": body["items"], "scores": body["scores"]}


def mlflow_answer(text: str) -> dict:
    body = json.loads(text)["predictions"][0]
    return {"items": body["items"], "scores": body["scores"]}


def fuzz_ray(model_uri: str, tracking_uri: Optional[str], port: int, known_ids: Sequence[str], n: int,
             seed_value: int) -> dict:
    """Deploy the Ray Serve app on the Ray this process is connected to, fuzz it, and tear the app down."""
    from ray import serve

    from eimf.serving.ray_serve import ROUTE, app

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        args = {"model_uri": model_uri, "num_cpus": 0.5}
        if tracking_uri:
            args["tracking_uri"] = tracking_uri
        serve.run(app(args), name="eimf", route_prefix="/")
        good = {"history": list(known_ids[:20]), "k": 10, "exclude_seen": False}
        return fuzz_server("ray", f"http://127.0.0.1:{port}", ROUTE, good, known_ids, n, seed_value,
                           ray_serving_pids, ray_answer, lambda body: body)
    finally:
        serve.shutdown()


def start_eimf_serve(model_uri: str, tracking_uri: Optional[str], port: int, log: Path) -> subprocess.Popen:
    """``eimf serve`` as a user starts it: a Ray of its own (no ``RAY_ADDRESS``), in a process group of its own so
    that SIGINT can go to the whole group, as a terminal's Ctrl-C sends it."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return subprocess.Popen([sys.executable, "-m", "eimf.cli", "serve", model_uri, "--port", str(port)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGINT, grace_s: float = 60) -> Optional[int]:
    """Send ``sig`` to ``proc``'s process group and wait for it; SIGKILL the group if it has not exited within
    ``grace_s``. Its exit status (None if it had to be killed)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            return proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None
    with contextlib.suppress(ProcessLookupError):  # whatever of its group outlived it
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode


def fuzz_eimf_serve(model_uri: str, tracking_uri: Optional[str], port: int, known_ids: Sequence[str], n: int,
                    seed_value: int, log: Path) -> dict:
    """Start ``eimf serve`` on ``port`` (the replica's own HTTP server), fuzz it as :func:`fuzz_ray` fuzzes the
    app behind the proxy, and stop it with Ctrl-C (SIGINT to its group). The processes compared before and after
    are its Serve replica and proxy (descendants of the command); ``exit_status``: the command's, after SIGINT."""
    from eimf.serving.ray_serve import ROUTE

    proc = start_eimf_serve(model_uri, tracking_uri, port, log)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=600)
        good = {"history": list(known_ids[:20]), "k": 10, "exclude_seen": False}
        result = fuzz_server("eimf-serve", f"http://127.0.0.1:{port}", ROUTE, good, known_ids, n, seed_value,
                             lambda: ray_serving_pids(root=proc.pid), ray_answer, lambda body: body, log)
    finally:
        status = stop_group(proc)
    result.update(exit_status=status, log=str(log))
    return result


def start_mlflow_serve(model_uri: str, tracking_uri: Optional[str], port: int, log: Path) -> subprocess.Popen:
    # mlflow starts uvicorn by name: the venv's bin must be on PATH, as in an activated venv
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager",
                             "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_http(url: str, proc: Optional[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:  # not listening yet
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        time.sleep(1)
    raise RuntimeError(f"{url} did not answer in {timeout} s")


def fuzz_mlflow(model_uri: str, tracking_uri: Optional[str], port: int, known_ids: Sequence[str], n: int,
                seed_value: int, log: Path) -> dict:
    proc = start_mlflow_serve(model_uri, tracking_uri, port, log)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc)
        good = {"history": list(known_ids[:20]), "k": 10, "exclude_seen": False}
        return fuzz_server("mlflow", f"http://127.0.0.1:{port}", "/invocations", good, known_ids, n, seed_value,
                           lambda: tree_pids(proc.pid), mlflow_answer,
                           lambda body: b'{"dataframe_records": [' + body + b"]}", log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=60)


def problems(result: dict) -> List[str]:
    """What breaks the requirements: 5xx other than 503 (for MLflow: other than its documented causes), crashed
    or restarted processes, RSS off by more than 10 %, a changed answer."""
    out = []
    if result.get("exit_status", 0) != 0:
        out.append(f"exit status after SIGINT: {result['exit_status']} (None: killed after 60 s)")
    undocumented = [c for c, entry in result["causes_5xx"].items()
                    if result["server"] != "mlflow" or not mlflow_cause(c, entry)]
    if undocumented:
        out.append(f"5xx: {undocumented}")
    if result["crashed_or_restarted"]:
        out.append(f"processes changed: {result['crashed_or_restarted']}")
    if not result["rss_within_tolerance"]:
        out.append(f"RSS {result['rss_mb_before']} -> {result['rss_mb_after']} MB")
    if not result["same_answer"]:
        out.append("a correct request answers differently after the run")
    return out


SERVER_NAMES = {"ray": "Ray Serve through its proxy (`serve.run`)", "mlflow": "`mlflow models serve`",
                "eimf-serve": "`eimf serve` (the replica's own server)"}


def markdown(results: List[dict], top_reasons: int = 8) -> str:
    lines = ["| server | requests | 2xx | 4xx by reason | 5xx | 503 | dropped | crashed or restarted | "
             "RSS start / after warm-up -> end (MB) | same answer after |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ranked = list(r["4xx_by_reason"].items())
        reasons = "<br>".join(f"{n} × `{reason.replace('|', '/')}`" for reason, n in ranked[:top_reasons])
        if len(ranked) > top_reasons:
            reasons += (f"<br>{sum(n for _, n in ranked[top_reasons:])} × {len(ranked) - top_reasons} other reasons"
                        " (the JSON lists them)")
        causes = "<br>".join(f"{v['count']} × `{c.replace('|', '/')}`" for c, v in r["causes_5xx"].items())
        name = SERVER_NAMES.get(r["server"], r["server"])
        lines.append(f"| {name} | {r['sent']} | {r['2xx']} | {reasons} | {r['5xx']}{'<br>' + causes if causes else ''}"
                     f" | {r['503']} | {sum(r['dropped'].values())} | {len(r['crashed_or_restarted']) // 2} | "
                     f"{r['rss_mb_start']} / {r['rss_mb_before']} -> {r['rss_mb_after']} | "
                     f"{'yes' if r['same_answer'] else 'NO'} |")
    return "\n".join(lines)


def known_ids_of(model_uri: str) -> List[str]:
    from eimf.serving.pyfunc import load_recommender

    return load_recommender(model_uri)._raw.tolist()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", choices=("ray", "mlflow", "both", "eimf-serve", "all"), default="both",
                   help="both: ray and mlflow; all: those and eimf-serve")
    p.add_argument("--requests", type=int, default=10_000, help="per server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-uri", help="required unless --table-from")
    p.add_argument("--table-from", default=None, help="print the table of a saved --output JSON and exit")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    p.add_argument("--port", type=int, default=0, help="0: a free one")
    p.add_argument("--output", default=None, help="JSON of the results")
    args = p.parse_args(argv)
    if args.table_from:
        print(markdown(json.loads(Path(args.table_from).read_text())["results"]))
        return 0
    if not args.model_uri:
        p.error("--model-uri is required")
    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    known = known_ids_of(args.model_uri)
    results = []
    if args.server in ("mlflow", "both", "all"):
        log = Path(tempfile.mkdtemp(prefix="serving-fuzz-")) / "mlflow-serve.log"
        print(f"mlflow models serve logs to {log}", flush=True)
        results.append(fuzz_mlflow(args.model_uri, args.tracking_uri, args.port or free_port(), known,
                                   args.requests, args.seed, log))
    if args.server in ("eimf-serve", "all"):
        log = Path(tempfile.mkdtemp(prefix="serving-fuzz-")) / "eimf-serve.log"
        print(f"eimf serve logs to {log}", flush=True)
        results.append(fuzz_eimf_serve(args.model_uri, args.tracking_uri, args.port or free_port(), known,
                                       args.requests, args.seed, log))
    if args.server in ("ray", "both", "all"):
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            results.append(fuzz_ray(args.model_uri, args.tracking_uri, args.port or free_port(), known,
                                    args.requests, args.seed))
        finally:
            ray.shutdown()
    report = {"command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
              "date": time.strftime("%Y-%m-%d %H:%M"), "model_uri": args.model_uri, "results": results,
              "problems": {r["server"]: problems(r) for r in results}}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=1, default=str))
    print(markdown(results))
    for r in results:
        for cause, v in r["causes_5xx"].items():
            print(f"\n{r['server']} 5xx {v['count']} × {cause}\n  {v['repro']}")
        print(f"\n{r['server']} problems: {problems(r) or 'none'}; checks failed: {r['check_failures']}")
    return 1 if any(report["problems"].values()) else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
