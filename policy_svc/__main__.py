"""`python -m policy_svc`: PolicyService (gRPC), metrics, and in local mode TGI's HTTP API.

    python -m policy_svc --backend local --model-dir DIR --dtype bfloat16
    python -m policy_svc --backend tgi --tgi-url http://tgi:80 --tokenizer-dir DIR
Every flag can be set as ALPHAMATH_POLICY_<FLAG> or ALPHAMATH_<FLAG> (see --help).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from alphamath.service import (TGI_HTTP_PORT, add_model_server_flags, configure_threads, parse_config,
                               run_until_signal, serve_models, service_parser, setup_logging)

log = logging.getLogger("policy_svc")


def build_parser():
    p = service_parser("policy", __doc__.splitlines()[0])
    p.add_argument("--backend", choices=["local", "tgi"], default="local")
    add_model_server_flags(p, max_batch_size=64, unit="sequences",
                           model_help="HF model directory (default: the embedded SmolLM2 checkpoint)")
    p.add_argument("--tgi-url", default="http://127.0.0.1:8080", help="TGI server (backend tgi)")
    p.add_argument("--tokenizer-dir", default="", help="tokenizer for the chat template (backend tgi)")
    p.add_argument("--http-port", type=int, default=TGI_HTTP_PORT,
                   help="TGI-compatible HTTP API port in local mode (-1 disables)")
    return p


def load(args):
    from policy_svc.server import LoadedPolicy

    if args.backend == "tgi":
        from policy_svc.tgi import TGIPolicy

        tokenizer = None
        if args.tokenizer_dir:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_dir)
        policy = TGIPolicy(args.tgi_url, tokenizer=tokenizer)
        try:
            model_id = policy.info().get("model_id", "tgi")
        except Exception as e:  # noqa: BLE001 - TGI may come up later; generation retries
            log.warning("TGI /info unavailable at start", extra={"error": str(e)})
            model_id = "tgi"
        return LoadedPolicy(policy, model_id=model_id, checkpoint=args.checkpoint or model_id, backend="tgi")
    from alphamath.lm import LocalLM
    from alphamath.local import LocalPolicy
    from alphamath.model import embedded_checkpoint

    path = Path(args.model_dir) if args.model_dir else embedded_checkpoint()
    lm = LocalLM(path, dtype=args.dtype or None, device=args.device)
    return LoadedPolicy(LocalPolicy(lm), model_id=path.name, checkpoint=args.checkpoint or path.name,
                        path=str(path), backend="local", dtype=str(lm.model.dtype).replace("torch.", ""), lm=lm)


def main(argv=None) -> int:
    args = parse_config(build_parser(), argv)
    setup_logging("policy", args.log_level)
    configure_threads(log)
    from policy_svc.server import PolicyServer

    loaded = load(args)
    server = PolicyServer(loaded, host=args.host, port=args.port, metrics_port=args.metrics_port,
                          http_port=args.http_port if args.backend == "local" else -1, max_workers=args.max_workers,
                          max_batch_size=args.max_batch_size, window_s=args.batch_window_ms / 1000,
                          max_queue=args.max_queue, workers=8)  # LocalLM merges concurrent calls into its running batch
    server.grpc.set_serving(False)  # SERVING once the main thread serves the model (serve_models below)
    log.info("policy_svc serving", extra={"grpc_port": server.port, "metrics_port": server.metrics_port,
                                          "http_port": server.http_port, "backend": loaded.backend,
                                          "checkpoint": loaded.checkpoint})
    from alphamath.events import follow_checkpoints

    listener = follow_checkpoints(args, server, load, "policy")

    run_until_signal(lambda: (listener and listener.stop(), server.stop()), log,
                     work=lambda done: serve_models(done, lambda: server.servicer.loaded.lm,
                                                   ready=lambda: server.grpc.set_serving(True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
