"""The TGI-compatible HTTP API (validated against TGI's OpenAPI spec) and the `tgi` backend against it."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import jsonschema
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from alphamath import convert
from alphamath.pb import policy_pb2, policy_pb2_grpc
from alphamath.service import InvalidArgument, ServiceMetrics, Unavailable
from policy_svc.server import LoadedPolicy, PolicyServer
from policy_svc.tgi import TGIPolicy
from alphamath.local import LocalPolicy
from tests.test_policy_svc import tiny_lm

SPEC = Path(__file__).resolve().parents[2] / "shared" / "specs" / "tgi-openapi.json"
STOP = ["</step>", "</code>"]


def _jsonschema(node):
    """OpenAPI 3.0 `nullable: true` -> JSON Schema's null type."""
    if isinstance(node, list):
        return [_jsonschema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _jsonschema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


@pytest.fixture(scope="module")
def validate():
    spec = _jsonschema(json.loads(SPEC.read_text()))
    registry = Registry().with_resource("urn:tgi", Resource.from_contents(spec, default_specification=DRAFT202012))

    def check(instance, schema_name=None, pointer=None):
        ref = f"urn:tgi#{pointer}" if pointer else f"urn:tgi#/components/schemas/{schema_name}"
        jsonschema.Draft202012Validator({"$ref": ref}, registry=registry).validate(instance)

    return check


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory):
    lm = tiny_lm(request, tmp_path_factory)
    loaded = LoadedPolicy(LocalPolicy(lm), model_id="tiny-llama", checkpoint="tiny-0", backend="local", lm=lm)
    server = PolicyServer(loaded, host="127.0.0.1", port=0, metrics_port=-1, http_port=0, window_s=0.01,
                          metrics=ServiceMetrics("policy"))
    yield server, lm, f"http://127.0.0.1:{server.http_port}"
    server.stop(0)


def post(url, body, raw=False):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(r, timeout=60) as resp:
            payload = resp.read().decode()
            return resp.status, resp.headers.get("Content-Type"), payload if raw else json.loads(payload)
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), json.loads(e.read().decode())


def prompt(lm, q="What is 2+3?"):
    return LocalPolicy(lm).render_prompt(q)


def test_generate_matches_spec_and_engine(stack, validate):
    server, lm, url = stack
    p = prompt(lm)
    body = {"inputs": p, "parameters": {"do_sample": True, "temperature": 0.8, "seed": 5, "max_new_tokens": 10,
                                        "stop": STOP, "details": True, "decoder_input_details": True}}
    status, ctype, out = post(f"{url}/generate", body)
    assert status == 200 and ctype == "application/json"
    validate(out, "GenerateResponse")
    direct = lm.generate([p], 1, stop=STOP, temperature=0.8, max_new_tokens=10, seed=5)[0][0]
    d = out["details"]
    assert out["generated_text"] == direct.text
    assert d["generated_tokens"] == direct.token_count and d["seed"] == 5
    assert d["finish_reason"] == {"stop": "stop_sequence", "eos": "eos_token", "length": "length"}[direct.finish_reason]
    assert "".join(t["text"] for t in d["tokens"]) == direct.text
    assert all(t["logprob"] <= 0 for t in d["tokens"]) and len(d["prefill"]) > 0

    status, _, listed = post(url + "/", {**body, "stream": False})  # the route text_generation.Client uses
    assert status == 200
    validate(listed, pointer="/paths/~1/post/responses/200/content/application~1json/schema")
    assert listed[0]["generated_text"] == out["generated_text"]

    best = post(f"{url}/generate", {"inputs": p, "parameters": {"do_sample": True, "best_of": 3,
                                                                "max_new_tokens": 6}})[2]
    validate(best, "GenerateResponse")
    assert len(best["details"]["best_of_sequences"]) == 2


def test_generate_stream_sse(stack, validate):
    server, lm, url = stack
    status, ctype, raw = post(f"{url}/generate_stream", {"inputs": prompt(lm), "parameters": {"max_new_tokens": 6}},
                              raw=True)
    assert status == 200 and ctype == "text/event-stream"
    events = [json.loads(line[len("data:"):]) for line in raw.split("\n") if line.startswith("data:")]
    assert events and [e["index"] for e in events] == list(range(len(events)))
    for e in events:
        validate(e, "StreamResponse")
    assert events[-1]["details"]["generated_tokens"] == 6 and events[-1]["generated_text"] is not None
    assert all(e["details"] is None for e in events[:-1])


def test_health_info_and_errors(stack, validate):
    server, lm, url = stack
    with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
        assert r.status == 200
    with urllib.request.urlopen(f"{url}/info", timeout=5) as r:
        info = json.loads(r.read())
    validate(info, "Info")
    with pytest.raises(jsonschema.ValidationError):  # the validator does reject off-spec payloads
        validate({"generated_text": "x", "details": {"finish_reason": "done"}}, "GenerateResponse")
    assert info["model_id"] == "tiny-llama" and info["max_stop_sequences"] == 4
    for body, fragment in [
        ({"parameters": {}}, "`inputs`"),
        ({"inputs": "x", "parameters": {"temperature": 0}}, "temperature"),
        ({"inputs": "x", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}, "up to 4"),
        ({"inputs": "x", "parameters": {"best_of": 2}}, "sampling"),
        ({"inputs": "x", "parameters": {"top_k": 5}}, "top_k"),
        ({"inputs": "", "parameters": {}}, "prompts[0] is empty"),
        (b"{not json", "invalid JSON"),
    ]:
        status, _, err = post(f"{url}/generate", body)
        assert status == 422, body
        validate(err, "ErrorResponse")
        assert err["error_type"] == "validation" and fragment in err["error"], err
    server.http.healthy = False
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{url}/health", timeout=5)
        assert e.value.code == 503
        validate(json.loads(e.value.read()), "ErrorResponse")
    finally:
        server.http.healthy = True


def test_tgi_backend_against_the_real_server(stack):
    server, lm, url = stack
    tgi = TGIPolicy(url, tokenizer=lm.tokenizer)
    p = tgi.render_prompt("What is 7*6?")
    assert p == prompt(lm, "What is 7*6?")
    out = tgi.generate([p, prompt(lm)], 3, stop=STOP, temperature=0.9, max_new_tokens=8, seed=100)
    assert [len(x) for x in out] == [3, 3]
    for i, q in enumerate([p, prompt(lm)]):
        for k in range(3):  # sample k is TGI's request with seed 100+k
            direct = lm.generate([q], 1, stop=STOP, temperature=0.9, max_new_tokens=8, seed=100 + k)[0][0]
            got = out[i][k]
            assert (got.text, got.token_count, got.finish_reason) == (direct.text, direct.token_count,
                                                                      direct.finish_reason)
            assert got.cumulative_logprob < 0
    greedy = tgi.generate([p], 2, stop=STOP, temperature=0.0, max_new_tokens=5)
    assert greedy[0][0] == greedy[0][1]
    assert greedy[0][0].text == lm.generate([p], 1, stop=STOP, temperature=0.0, max_new_tokens=5)[0][0].text
    with pytest.raises(InvalidArgument):
        tgi.generate([p], 1, stop=["a"] * 5, temperature=0.5, max_new_tokens=4)
    tgi.close()


def test_policy_svc_with_tgi_backend_over_grpc(stack):
    _, lm, url = stack
    front = PolicyServer(LoadedPolicy(TGIPolicy(url, tokenizer=lm.tokenizer), model_id="tiny-llama", checkpoint="tgi",
                                      backend="tgi"), host="127.0.0.1", port=0, metrics_port=-1, workers=4,
                         metrics=ServiceMetrics("policy"))
    try:
        stub = policy_pb2_grpc.PolicyServiceStub(grpc.insecure_channel(f"127.0.0.1:{front.port}"))
        resp = stub.Generate(policy_pb2.GenerateRequest(prompts=[prompt(lm)], n=2, stop=STOP, temperature=0.7,
                                                        max_new_tokens=6, seed=3), timeout=60)
        samples = convert.completions_from_pb(resp)[0]
        assert len(samples) == 2 and all(1 <= s.token_count <= 6 for s in samples)
        assert stub.Info(policy_pb2.InfoRequest(), timeout=5).backend == "tgi"
    finally:
        front.stop(0)


class _Flaky(BaseHTTPRequestHandler):
    """Answers 429 (overloaded) `fails` times, then a valid TGI response."""

    fails = 2
    seen = 0

    def log_message(self, *a):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        cls = type(self)
        cls.seen += 1
        if cls.seen <= cls.fails:
            body, status = {"error": "Model is overloaded", "error_type": "overloaded"}, 429
        else:
            body, status = [{"generated_text": "ok</step>", "details": {
                "finish_reason": "stop_sequence", "generated_tokens": 2, "seed": None, "prefill": [],
                "tokens": [{"id": 1, "text": "ok", "logprob": -0.5, "special": False},
                           {"id": 2, "text": "</step>", "logprob": -0.25, "special": False}]}}], 200
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_tgi_backend_retries_overload_then_gives_up():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        tgi = TGIPolicy(f"http://127.0.0.1:{httpd.server_address[1]}", backoff_s=0.01, max_retries=3)
        [[s]] = tgi.generate(["p"], 1, stop=["</step>"], temperature=0.5, max_new_tokens=4, seed=1)
        assert (s.text, s.token_count, s.cumulative_logprob, s.finish_reason) == ("ok</step>", 2, -0.75, "stop")
        assert _Flaky.seen == 3
        _Flaky.seen, _Flaky.fails = 0, 100
        with pytest.raises(Unavailable, match="after 4 attempts"):
            tgi.generate(["p"], 1, stop=[], temperature=0.5, max_new_tokens=4, seed=1)
        assert _Flaky.seen == 4
    finally:
        httpd.shutdown()
        httpd.server_close()
    dead = TGIPolicy("http://127.0.0.1:9", backoff_s=0.01, max_retries=1)
    with pytest.raises(Unavailable):
        dead.generate(["p"], 1, stop=[], temperature=0.0, max_new_tokens=4)
