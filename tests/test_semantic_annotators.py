"""Annotators: the shared retry/validation loop, the metadata baseline, the OpenAI-compatible backend against a
small local HTTP server on 127.0.0.1 that emulates ``/v1/chat/completions``."""
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from eimf.config import OpenAIConfig, SemanticConfig
from eimf.semantic.annotators import AnnotationRequest, Annotator, Generation, build_annotator
from eimf.semantic.annotators.metadata import MetadataAnnotator, describe_groups, split_item_text, title_words
from eimf.semantic.annotators.openai_compat import OpenAICompatAnnotator
from eimf.semantic.prompts import build_prompt, parse_answer

VALID = json.dumps({"interests": [{"name": "Sci-fi", "description": "Space films.", "evidence": [1, 2]}]})


def request(user, texts, k=4):
    items = {i + 1: t for i, t in enumerate(texts)}
    p = build_prompt(list(items), len(items), items, k, token_budget=4096)
    return AnnotationRequest(user=user, messages=p.messages, history_hash=p.history_hash, n_items=p.n_items,
                             max_interests=k, item_texts=p.item_texts, item_ids=p.item_ids)


class Scripted(Annotator):
    """Answers from a per-user list of texts (the last one repeats); counts calls."""
    kind = "scripted"

    def __init__(self, script, max_attempts=3):
        super().__init__(max_attempts)
        self.script, self.calls, self.rounds = script, {}, []

    @property
    def model_id(self):
        return "scripted"

    def generate(self, requests, attempt):
        self.rounds.append([r.user for r in requests])
        out = []
        for r in requests:
            n = self.calls.get(r.user, 0)
            self.calls[r.user] = n + 1
            answers = self.script[r.user]
            a = answers[min(n, len(answers) - 1)]
            out.append(Generation(text=None, error=a[1:]) if a.startswith("!") else
                       Generation(text=a, tokens_in=10, tokens_out=5))
        return out


def test_retry_loop_resends_only_invalid_and_records_failures():
    reqs = [request(u, ["Alien (1979) | Sci-Fi", "Aliens (1986) | Sci-Fi"]) for u in (1, 2, 3, 4)]
    ann = Scripted({1: [VALID], 2: ["{oops", VALID], 3: ["{oops", "nope", "still no"], 4: ["!timeout", VALID]})
    res = ann.annotate(reqs)
    assert [r.user for r in res] == [1, 2, 3, 4]
    assert ann.rounds == [[1, 2, 3, 4], [2, 3, 4], [3]]  # only the invalid ones go again
    assert [r.status for r in res] == ["ok", "ok", "failed", "ok"]
    assert [r.attempts for r in res] == [1, 2, 3, 2]
    assert res[1].tokens_in == 20 and res[1].tokens_out == 10  # every attempt is accounted
    assert res[2].interests is None and res[2].raw_text == "still no" and "not JSON" in res[2].error
    assert res[0].interests[0]["evidence"] == [1, 2] and res[0].model == "scripted"
    assert res[3].tokens_in == 10  # the transport failure produced no usage


# ------------------------------------------------------------------------------------------- metadata
ML_TEXTS = [
    "Toy Story (1995) | Animation, Children's, Comedy",
    "Alien (1979) | Action, Horror, Sci-Fi, Thriller",
    "Aladdin (1992) | Animation, Children's, Comedy, Musical",
    "Star Wars: Episode IV - A New Hope (1977) | Action, Adventure, Fantasy, Sci-Fi",
    "Lion King, The (1994) | Animation, Children's, Musical",
    "Terminator 2: Judgment Day (1991) | Action, Sci-Fi, Thriller",
    "Beauty and the Beast (1991) | Animation, Children's, Musical",
    "Matrix, The (1999) | Action, Sci-Fi, Thriller",
    "Sense and Sensibility (1995) | Drama, Romance",
    "Pretty Woman (1990) | Comedy, Romance",
]

BEAUTY_TEXTS = [
    "OPI Nail Lacquer, Big Apple Red, 0.5 Fluid Ounce",
    "Essie Nail Polish, Ballet Slippers, 0.46 oz",
    "Seche Vite Dry Fast Top Coat Nail Polish 0.5 oz",
    "CND Shellac Nail Polish, Romantique, 0.25 fl oz",
    "Neutrogena Oil-Free Acne Wash Facial Cleanser, 6 Ounce",
    "Cetaphil Gentle Skin Cleanser for All Skin Types, 16 Ounce",
    "CeraVe Foaming Facial Cleanser, 12 Ounces",
]


def term_embed(texts):
    """A cheap stand-in for the sentence encoder: hashed bag of categories / title words."""
    out = np.zeros((len(texts), 128), dtype=np.float32)
    for i, t in enumerate(texts):
        _, cats, _ = split_item_text(t)
        for w in cats or title_words(t):
            out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % 128] += 1.0
    return out + 1e-3


def test_metadata_helpers():
    assert split_item_text(ML_TEXTS[0]) == ("Toy Story (1995)", ["Animation", "Children's", "Comedy"], 1995)
    assert split_item_text("Just a title") == ("Just a title", [], None)
    assert title_words("OPI Nail Lacquer, Big Apple Red, 0.5 Fluid Ounce") == ["opi", "nail", "lacquer", "big",
                                                                              "apple", "red"]


def test_metadata_annotator_names_groups_by_shared_genres():
    ann = MetadataAnnotator(embed=term_embed, encoder_name="terms")
    req = request(7, ML_TEXTS, k=3)
    (res,) = ann.annotate([req])
    assert res.ok and res.attempts == 1 and res.tokens_in == 0 and 1 <= len(res.interests) <= 3
    assert parse_answer(res.raw_text, 3, len(ML_TEXTS))[1] is None
    names = [i["name"] for i in res.interests]
    assert len(set(names)) == len(names)
    # the animated musicals and the sci-fi action films are told apart and named by their genres
    anim = next(i for i in res.interests if 1 in i["evidence"])
    scifi = next(i for i in res.interests if 2 in i["evidence"])
    assert anim is not scifi
    assert set(anim["evidence"]) <= {1, 3, 5, 7, 10}
    assert {"Animation", "Children's"} & set(anim["name"].split(" & "))
    assert set(scifi["evidence"]) >= {2, 6, 8}
    assert "Sci-Fi" in scifi["name"] or "Action" in scifi["name"]
    assert "19" in scifi["description"] and len(scifi["description"]) <= 200  # decades
    assert res.model == "metadata-m1:terms:min2"


def test_metadata_annotator_on_titles_without_categories():
    ann = MetadataAnnotator(embed=term_embed, encoder_name="terms")
    (res,) = ann.annotate([request(8, BEAUTY_TEXTS, k=2)])
    assert res.ok and len(res.interests) == 2
    nail = next(i for i in res.interests if 1 in i["evidence"])
    assert set(nail["evidence"]) == {1, 2, 3, 4} and "Nail" in nail["name"]
    clean = next(i for i in res.interests if 5 in i["evidence"])
    assert "Cleanser" in clean["name"] and "products" in clean["description"]


def test_metadata_edge_cases():
    emb = term_embed(["Only one (2000) | Drama"])
    assert len(describe_groups(["Only one (2000) | Drama"], emb, 4)) == 1
    ann = MetadataAnnotator(embed=term_embed, encoder_name="terms")
    res = ann.annotate([request(1, ["(no text)", "(no text)", "x"]), request(2, ["A | B"] * 5)])
    assert all(r.ok for r in res)
    assert build_annotator(SemanticConfig(annotator="metadata"), embed=term_embed).kind == "metadata"
    with pytest.raises(ValueError):
        build_annotator(SemanticConfig(annotator="nope"))


# ---------------------------------------------------------------------------- OpenAI-compatible server
class FakeOpenAI:
    """A tiny ``/v1/chat/completions`` server. ``behaviour(body, n)`` -> (status, content or payload, delay_s)
    where ``n`` counts the calls for the same messages (0 for the first)."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.bodies, self.counts, self.lock = [], {}, threading.Lock()
        self.inflight = self.max_inflight = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = json.dumps(body["messages"], sort_keys=True)
                with outer.lock:
                    n = outer.counts.get(key, 0)
                    outer.counts[key] = n + 1
                    outer.bodies.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    outer.inflight += 1
                    outer.max_inflight = max(outer.max_inflight, outer.inflight)
                try:
                    status, content, delay = outer.behaviour(body, n)
                    time.sleep(delay)
                    if status == 200:
                        payload = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": content}}],
                                   "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}
                    else:
                        payload = {"error": {"message": str(content), "type": "err", "code": status}}
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with outer.lock:
                        outer.inflight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_server():
    servers = []

    def make(behaviour):
        s = FakeOpenAI(behaviour)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def client(server, **kw):
    opts = dict(base_url=server.base_url, model="fake-llm", api_key_env="EIMF_TEST_KEY", timeout_s=5.0,
                max_concurrency=2, request_retries=2, backoff_initial_s=0.01, backoff_max_s=0.05, max_attempts=3)
    opts.update(kw)
    return OpenAICompatAnnotator(**opts)


def test_openai_invalid_then_valid_with_usage_and_schema(fake_server, monkeypatch):
    monkeypatch.setenv("EIMF_TEST_KEY", "sk-test-123")
    srv = fake_server(lambda body, n: (200, "{not json" if n == 0 else VALID, 0.0))
    reqs = [request(u, [f"Movie {u} (1990) | Sci-Fi", "Other (1991) | Sci-Fi"]) for u in (1, 2, 3)]
    with client(srv) as ann:
        res = ann.annotate(reqs)
    assert [r.status for r in res] == ["ok"] * 3 and [r.attempts for r in res] == [2, 2, 2]
    assert all(r.tokens_in == 200 and r.tokens_out == 40 for r in res)  # both attempts counted
    assert len(srv.bodies) == 6
    path, headers, body = next(b for b in srv.bodies if b[2]["messages"] == reqs[0].messages)
    assert path == "/v1/chat/completions" and headers["authorization"] == "Bearer sk-test-123"
    assert body["model"] == "fake-llm" and body["messages"] == reqs[0].messages and body["temperature"] == 0
    rf = body["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["schema"]["properties"]["interests"]["maxItems"] == 4
    assert res[0].model == "openai:fake-llm:t0"


def test_openai_vllm_structured_outputs_option(fake_server):
    srv = fake_server(lambda body, n: (200, VALID, 0.0))
    with client(srv, structured_output="vllm") as ann:
        (res,) = ann.annotate([request(1, ["a", "b"])])
    body = srv.bodies[0][2]
    assert res.ok and "response_format" not in body
    assert body["structured_outputs"]["json"]["required"] == ["interests"]


def test_openai_always_invalid_is_recorded_failed(fake_server):
    srv = fake_server(lambda body, n: (200, f"answer {n}: I like films", 0.0))
    with client(srv) as ann:
        (res,) = ann.annotate([request(1, ["a", "b"])])
    assert res.status == "failed" and res.attempts == 3 and res.raw_text == "answer 2: I like films"
    assert res.interests is None and res.tokens_in == 300 and "not JSON" in res.error


def test_openai_transport_errors_retry_with_backoff(fake_server):
    srv = fake_server(lambda body, n: (500, "boom", 0.0) if n < 2 else (200, VALID, 0.0))
    with client(srv) as ann:
        (res,) = ann.annotate([request(1, ["a", "b"])])
    assert res.ok and res.attempts == 1 and len(srv.bodies) == 3  # two 500s retried inside one attempt
    srv2 = fake_server(lambda body, n: (400, "bad request", 0.0))
    with client(srv2) as ann:
        (res,) = ann.annotate([request(1, ["a", "b"])])
    assert res.status == "failed" and "BadRequestError" in res.error
    assert len(srv2.bodies) == 3  # not retried by the transport layer; once per attempt


def test_openai_timeouts(fake_server):
    srv = fake_server(lambda body, n: (200, VALID, 1.5 if n == 0 else 0.0))
    with client(srv, timeout_s=0.3, request_retries=1) as ann:
        (res,) = ann.annotate([request(1, ["a", "b"])])
    assert res.ok and len(srv.bodies) == 2
    slow = fake_server(lambda body, n: (200, VALID, 1.0))
    t0 = time.perf_counter()
    with client(slow, timeout_s=0.2, request_retries=1, max_attempts=1) as ann:
        (res,) = ann.annotate([request(1, ["a", "b"])])
    assert res.status == "failed" and "Timeout" in res.error and time.perf_counter() - t0 < 5


def test_openai_bounded_concurrency(fake_server):
    srv = fake_server(lambda body, n: (200, VALID, 0.15))
    reqs = [request(u, [f"m{u}", "x"]) for u in range(8)]
    with client(srv, max_concurrency=3) as ann:
        res = ann.annotate(reqs)
    assert all(r.ok for r in res) and [r.user for r in res] == list(range(8))
    assert 2 <= srv.max_inflight <= 3


def test_openai_from_config():
    cfg = SemanticConfig(annotator="openai", openai=OpenAIConfig(base_url="http://127.0.0.1:9/v1", model="m",
                                                                 max_concurrency=2))
    ann = build_annotator(cfg)
    assert isinstance(ann, OpenAICompatAnnotator) and ann.max_concurrency == 2 and ann.model == "m"
    ann.close()


class _StallingPass:
    """Stands in for the ray.data.llm processor's output: answers the first prompt, then hangs."""

    def iter_rows(self):
        yield {"idx": 0, "text": '{"interests": []}', "tokens_in": 3, "tokens_out": 2}
        time.sleep(60)


def test_vllm_stream_yields_answers_as_they_come_and_bounds_the_wait_for_the_next(ray_session, tmp_path):
    """The one-pass stream hands back each answer before the pass ends, and a stalled pass fails after
    semantic.vllm.timeout_s without an answer, naming how far it got (not after a bound on the whole pass)."""
    from eimf.semantic.annotators.vllm_ray import VLLMRayAnnotator

    (tmp_path / "config.json").write_text("{}")  # a model folder is all the constructor checks
    ann = VLLMRayAnnotator(str(tmp_path), batch_size=1, max_tokens=8, timeout_s=1.0)
    ann._processor = lambda ds: _StallingPass()
    reqs = [request(u, ["Toy Story (1995) | Animation", "Heat (1995) | Action"]) for u in (1, 2)]
    stream = ann.generate_stream(reqs, attempt=1)
    first = next(stream)
    assert [i for i, _ in first] == [0] and first[0][1].text == '{"interests": []}'
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError, match=r"vllm.timeout_s=1s \(1 of 2 prompts answered\)"):
        next(stream)
    assert time.perf_counter() - t0 < 10
