"""Text Generation Inference: a Policy backend that calls a TGI server, and a TGI-compatible server.

`TGIPolicy` is the production backend for GPU pods running TGI: n samples per prompt are n
concurrent requests with seeds seed+k (TGI's best_of returns only the best sample and forbids
seeds), stop sequences are TGI's, and the step prior comes from the per-token logprobs in
`details`. 429/503 (overloaded, shard not ready) and connection errors are retried with
exponential backoff; a server that stays down raises `Unavailable`.

`TGIHttpServer` serves TGI's HTTP API (`/`, `/generate`, `/generate_stream`, `/health`, `/info`,
per ../shared/specs/tgi-openapi.json) from the local backend, through the same batcher as gRPC,
so the `tgi` backend can be exercised for real where TGI itself cannot run. Generation is not
token-streamed by the local engine: /generate_stream sends the tokens once the sample is done.
"""
from __future__ import annotations

import json
import logging
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Sequence

from alphamath.interfaces import Sample
from alphamath.service import InvalidArgument, Overloaded, Unavailable
from alphamath.steps import render_prompt

log = logging.getLogger(__name__)

_FINISH_FROM_TGI = {"stop_sequence": "stop", "eos_token": "eos", "length": "length"}
_FINISH_TO_TGI = {v: k for k, v in _FINISH_FROM_TGI.items()}
TGI_VERSION = "3.3.6-dev0"  # the API version of the spec this server follows


# ==================================================================== client backend

class TGIPolicy:
    """Policy over a TGI server (text_generation.Client)."""

    def __init__(self, url: str, *, tokenizer=None, timeout_s: float = 120.0, max_retries: int = 5,
                 backoff_s: float = 0.2, max_backoff_s: float = 5.0, concurrency: int = 32):
        from text_generation import Client

        self.url = url.rstrip("/")
        self.client = Client(self.url, timeout=timeout_s)
        self.tokenizer = tokenizer
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="tgi")

    def render_prompt(self, question: str) -> str:
        return render_prompt(question, self.tokenizer)

    def info(self) -> dict:
        import requests

        return self._retry(lambda: _get_json(requests, f"{self.url}/info", self.client.timeout))

    def generate(self, prompts: Sequence[str], n: int, *, stop: Sequence[str], temperature: float,
                 top_p: float = 1.0, max_new_tokens: int = 256,
                 seed: int | Sequence[int | None] | None = None) -> list[list[Sample]]:
        greedy = temperature == 0
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(prompts)
        drawn = random.getrandbits(62)
        jobs = []
        for p, seed in zip(prompts, seeds):
            seed = drawn if seed is None else seed
            # Greedy samples are identical: one request per prompt, copied n times.
            for k in range(1 if greedy else n):
                jobs.append(self.pool.submit(self._one, p, stop, temperature, top_p, max_new_tokens,
                                             None if greedy else (seed + k) % (1 << 63) or 1))
        samples = [j.result() for j in jobs]
        per = 1 if greedy else n
        return [[samples[i * per + (0 if greedy else k)] for k in range(n)] for i in range(len(prompts))]

    def _one(self, prompt, stop, temperature, top_p, max_new_tokens, seed) -> Sample:
        kw = dict(max_new_tokens=max_new_tokens, stop_sequences=list(stop))
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, seed=seed,
                      top_p=top_p if top_p < 1.0 else None)  # TGI requires top_p < 1
        resp = self._retry(lambda: self.client.generate(prompt, **kw))
        d = resp.details
        logprob = sum(t.logprob for t in d.tokens if t.logprob is not None)
        return Sample(text=resp.generated_text, token_count=d.generated_tokens, cumulative_logprob=logprob,
                      finish_reason=_FINISH_FROM_TGI.get(getattr(d.finish_reason, "value", d.finish_reason), "length"))

    def _retry(self, call):
        """Retry overload (429), not-ready (503/424) and connection failures with jittered backoff."""
        import requests
        from text_generation import errors

        retryable = (errors.OverloadedError, errors.RateLimitExceededError, errors.ShardNotReadyError,
                     errors.ShardTimeoutError, requests.ConnectionError, requests.Timeout, _HTTPUnavailable)
        delay = self.backoff_s
        for attempt in range(self.max_retries + 1):
            try:
                return call()
            except errors.ValidationError as e:
                raise InvalidArgument(f"TGI rejected the request: {e}") from e
            except errors.UnknownError as e:
                # the client maps 503 (no error_type) to UnknownError; TGI's own messages say so
                if "unhealthy" not in str(e).lower() and "unavailable" not in str(e).lower():
                    raise
                last = e
            except retryable as e:
                last = e
            if attempt < self.max_retries:
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self.max_backoff_s)
        raise Unavailable(f"TGI at {self.url} unavailable after {self.max_retries + 1} attempts: {last}") from last

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class _HTTPUnavailable(Exception):
    pass


def _get_json(requests, url: str, timeout: float) -> dict:
    r = requests.get(url, timeout=timeout)
    if r.status_code in (429, 503):
        raise _HTTPUnavailable(f"{url}: HTTP {r.status_code}")
    r.raise_for_status()
    return r.json()


# ==================================================================== token details

def sampling_logprobs(logits, temperature: float, top_p: float):
    """log p of every token under the sampling distribution: softmax(logits / temperature),
    renormalised over the top-p nucleus (tokens outside it get -inf), as TGI's warpers do."""
    import torch

    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_lp, order = torch.sort(logp, dim=-1, descending=True)
        p = sorted_lp.exp()
        drop = (torch.cumsum(p, dim=-1) - p) >= top_p  # never drops the top token
        kept = sorted_lp.masked_fill(drop, float("-inf"))
        logp = torch.full_like(logp, float("-inf")).scatter(-1, order, kept - torch.logsumexp(kept, -1, keepdim=True))
    return logp


def token_details(lm, prompt: str, sample: Sample, prefill: bool = False, temperature: float = 0.0,
                  top_p: float = 1.0) -> tuple[list[dict], list[dict], int]:
    """Per-token (id, text, logprob, special) of a sample for TGI's `details`, its prefill, input length.

    The policy interface returns text and the summed logprob; the tokens are recovered by
    encoding the text (plus EOS when it ended there) and scored by one teacher-forced forward,
    under the distribution LocalLM reports and TGI returns: the one the tokens were sampled from
    (logits / temperature over the top-p nucleus; raw logits when greedy; the prefill's tokens are
    always scored under the raw logits). Everything runs
    under the LM's lock: fast tokenizers must not be used from two threads at once.
    """
    import torch

    with lm.lock, torch.inference_mode():
        tok = lm.tokenizer
        p_ids = lm.encode(prompt)
        g_ids = lm.encode(sample.text) if sample.text else []
        if sample.finish_reason == "eos" and lm.eos_ids:
            g_ids = g_ids + [min(lm.eos_ids)]
        ids = p_ids + g_ids
        special = set(getattr(tok, "all_special_ids", []) or [])
        start = 0 if prefill else len(p_ids) - 1
        lp_of: dict[int, float | None] = {}
        if len(ids) > start + 1:
            h, _ = lm.model.hidden(torch.tensor([ids], device=lm.device))
            logits = lm.model.lm_head(h[0, start:-1]).float()
            logp = torch.log_softmax(logits, dim=-1)
            n_gen = len(g_ids)
            if temperature > 0 and n_gen:
                logp[-n_gen:] = sampling_logprobs(logits[-n_gen:], temperature, top_p)
            target = torch.tensor(ids[start + 1:], device=lm.device).unsqueeze(1)
            picked = logp.gather(1, target).squeeze(1).tolist()
            lp_of = {i: _finite(v) for i, v in zip(range(start + 1, len(ids)), picked)}
        texts = [tok.decode([i]) for i in ids]
    tokens = [{"id": i, "text": texts[len(p_ids) + j], "logprob": lp_of.get(len(p_ids) + j),
               "special": i in special} for j, i in enumerate(g_ids)]
    pre = [{"id": i, "text": texts[j], "logprob": lp_of.get(j)} for j, i in enumerate(p_ids)] if prefill else []
    return tokens, pre, len(p_ids)


# ==================================================================== TGI-compatible server

class _Invalid(Exception):
    """422 validation error."""


def _parse_parameters(body: dict, servicer, max_best_of: int) -> dict:
    """TGI GenerateParameters -> our generate() arguments (TGI's semantics and error messages)."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), str):
        raise _Invalid("Input validation error: `inputs` must be a string")
    p = body.get("parameters") or {}
    if not isinstance(p, dict):
        raise _Invalid("Input validation error: `parameters` must be an object")
    unsupported = [k for k in ("grammar", "adapter_id", "top_n_tokens", "typical_p", "top_k", "truncate",
                               "repetition_penalty", "frequency_penalty") if p.get(k) not in (None, 0)]
    if p.get("watermark"):
        unsupported.append("watermark")
    if unsupported:
        raise _Invalid(f"Input validation error: not supported by this server: {', '.join(unsupported)}")
    do_sample = bool(p.get("do_sample"))
    temperature, top_p, seed = p.get("temperature"), p.get("top_p"), p.get("seed")
    if temperature is not None and not (isinstance(temperature, (int, float)) and temperature > 0):
        raise _Invalid("Input validation error: `temperature` must be strictly positive")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise _Invalid("Input validation error: `top_p` must be > 0.0 and <= 1.0")
    if seed is not None and not (isinstance(seed, int) and seed > 0):
        raise _Invalid("Input validation error: `seed` must be a positive integer")
    best_of = p.get("best_of") or 1
    if not isinstance(best_of, int) or not 1 <= best_of <= max_best_of:
        raise _Invalid(f"Input validation error: `best_of` must be in [1, {max_best_of}]")
    sampling = do_sample or (temperature is not None and temperature != 1.0) or (top_p is not None and top_p < 1.0)
    if best_of > 1 and not sampling:
        raise _Invalid("Input validation error: you must use sampling when `best_of` is > 1")
    stop = p.get("stop") or []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _Invalid("Input validation error: `stop` must be a list of strings")
    if len(stop) > 4:
        raise _Invalid(f"Input validation error: `stop` supports up to 4 stop sequences. Given: {len(stop)}")
    max_new = p.get("max_new_tokens")
    if max_new is None:
        max_new = min(1024, servicer.limits.max_new_tokens)
    if not isinstance(max_new, int) or max_new < 1:
        raise _Invalid("Input validation error: `max_new_tokens` must be strictly positive")
    return dict(inputs=body["inputs"], n=best_of, stop=stop,
                temperature=(temperature or 1.0) if sampling else 0.0, top_p=top_p or 1.0,
                max_new_tokens=max_new, seed=seed, details=p.get("details", True) is not False,
                decoder_input_details=bool(p.get("decoder_input_details")),
                return_full_text=bool(p.get("return_full_text")))


class TGIHttpServer:
    """TGI's HTTP generate API over a PolicyServicer (threaded stdlib server)."""

    max_best_of = 8

    def __init__(self, servicer, host: str = "0.0.0.0", port: int = 8080):
        self.servicer = servicer
        handler = type("Handler", (_Handler,), {"app": self})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.healthy = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="tgi-http", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -------------------------------------------------------------- endpoints

    def info(self) -> dict:
        s = self.servicer
        m = s.loaded
        return {"model_id": m.model_id, "model_sha": None, "model_pipeline_tag": "text-generation",
                "max_concurrent_requests": s.batcher.max_queue, "max_best_of": self.max_best_of,
                "max_stop_sequences": 4, "max_input_tokens": s.limits.max_input_chars,
                "max_total_tokens": s.limits.max_input_chars + s.limits.max_new_tokens,
                "validation_workers": 1, "max_client_batch_size": s.limits.max_prompts,
                "router": "alphamath-policy_svc", "version": TGI_VERSION, "sha": None,
                "docker_label": None}

    def run(self, body) -> tuple[dict, list[dict]]:
        """One TGI request -> (params, [sequence dicts], best first)."""
        params = _parse_parameters(body, self.servicer, self.max_best_of)
        samples = self.servicer.generate([params["inputs"]], params["n"], stop=params["stop"],
                                         temperature=params["temperature"], top_p=params["top_p"],
                                         max_new_tokens=params["max_new_tokens"], seed=params["seed"])[0]
        lm = self.servicer.loaded.lm
        seqs = []
        for k, s in enumerate(samples):
            tokens, prefill, input_length = [], [], 0
            if lm is not None:
                tokens, prefill, input_length = token_details(lm, params["inputs"], s,
                                                              params["decoder_input_details"],
                                                              params["temperature"], params["top_p"])
            text = (params["inputs"] + s.text) if params["return_full_text"] else s.text
            seed = params["seed"]
            seqs.append({"generated_text": text, "finish_reason": _FINISH_TO_TGI[s.finish_reason],
                         "generated_tokens": s.token_count, "prefill": prefill, "tokens": tokens,
                         "seed": None if seed is None else seed, "cumulative_logprob": s.cumulative_logprob,
                         "input_length": input_length})
        seqs.sort(key=lambda q: -q["cumulative_logprob"])  # best_of: the most likely sequence wins
        return params, seqs

    def generate_response(self, body) -> dict:
        params, seqs = self.run(body)
        best = seqs[0]
        out = {"generated_text": best["generated_text"]}
        if params["details"]:
            details = {k: best[k] for k in ("finish_reason", "generated_tokens", "prefill", "tokens", "seed")}
            if len(seqs) > 1:
                details["best_of_sequences"] = [
                    {k: q[k] for k in ("generated_text", "finish_reason", "generated_tokens", "prefill", "tokens",
                                       "seed")} for q in seqs[1:]]
            out["details"] = details
        return out

    def stream_events(self, body) -> list[dict]:
        p = body.get("parameters") if isinstance(body, dict) else None
        if isinstance(p, dict) and isinstance(p.get("best_of"), int) and p["best_of"] > 1:
            raise _Invalid("Input validation error: `best_of` != 1 is not allowed for this endpoint")
        params, seqs = self.run(body)
        best = seqs[0]
        tokens = best["tokens"] or []
        events = []
        for i, t in enumerate(tokens):
            last = i == len(tokens) - 1
            events.append({"index": i, "token": t, "top_tokens": [],
                           "generated_text": best["generated_text"] if last else None,
                           "details": {"finish_reason": best["finish_reason"],
                                       "generated_tokens": best["generated_tokens"],
                                       "input_length": best["input_length"], "seed": best["seed"]} if last else None})
        return events


class _Handler(BaseHTTPRequestHandler):
    app: TGIHttpServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # route access logs through logging (JSON)
        log.debug("http %s", fmt % args)

    def _send_json(self, status: int, payload) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, error_type: str) -> None:
        self._send_json(status, {"error": message, "error_type": error_type})

    def do_GET(self):
        if self.path == "/health":
            if self.app.healthy:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self._error(503, "unhealthy", "healthcheck")
        elif self.path == "/info":
            self._send_json(200, self.app.info())
        else:
            self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self):
        if self.path not in ("/", "/generate", "/generate_stream"):
            self._error(404, f"no route {self.path}", "not_found")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"null")
        except (ValueError, json.JSONDecodeError) as e:
            self._error(422, f"Input validation error: invalid JSON body: {e}", "validation")
            return
        stream = self.path == "/generate_stream" or (self.path == "/" and isinstance(body, dict)
                                                      and bool(body.get("stream")))
        try:
            if stream:
                self._send_stream(self.app.stream_events(body))
            else:
                out = self.app.generate_response(body)
                self._send_json(200, [out] if self.path == "/" else out)
        except (_Invalid, InvalidArgument) as e:
            msg = str(e) if str(e).startswith("Input validation error") else f"Input validation error: {e}"
            self._error(422, msg, "validation")
        except Overloaded:
            self._error(429, "Model is overloaded", "overloaded")
        except Exception as e:  # noqa: BLE001
            log.exception("TGI generate failed")
            self._error(424, f"Request failed during generation: {e}", "generation")

    def _send_stream(self, events: list[dict]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        for ev in events:
            self.wfile.write(b"data:" + json.dumps(ev).encode() + b"\n\n")
            self.wfile.flush()
        self.close_connection = True


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None
