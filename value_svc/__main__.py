"""`python -m value_svc`: ValueService (gRPC) over the local value-head model, and metrics.

Every flag can be set as ALPHAMATH_VALUE_<FLAG> or ALPHAMATH_<FLAG> (see --help).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from alphamath.service import (add_model_server_flags, configure_threads, parse_config, run_until_signal,
                               serve_models, service_parser, setup_logging)

log = logging.getLogger("value_svc")


def build_parser():
    p = service_parser("value", __doc__.splitlines()[0])
    add_model_server_flags(p, max_batch_size=128, unit="states",
                           model_help="HF model directory with value head (default: embedded)")
    return p


def load(args):
    from alphamath.lm import LocalLM
    from alphamath.local import LocalValue
    from alphamath.model import embedded_checkpoint
    from value_svc.server import LoadedValue

    path = Path(args.model_dir) if args.model_dir else embedded_checkpoint()
    lm = LocalLM(path, dtype=args.dtype or None, device=args.device)
    return LoadedValue(LocalValue(lm), model_id=path.name, checkpoint=args.checkpoint or path.name, path=str(path),
                       dtype=str(lm.model.dtype).replace("torch.", ""))


def main(argv=None) -> int:
    args = parse_config(build_parser(), argv)
    setup_logging("value", args.log_level)
    configure_threads(log)
    from value_svc.server import ValueServer

    loaded = load(args)
    server = ValueServer(loaded, host=args.host, port=args.port, metrics_port=args.metrics_port,
                         max_workers=args.max_workers, max_batch_size=args.max_batch_size,
                         window_s=args.batch_window_ms / 1000, max_queue=args.max_queue)
    server.grpc.set_serving(False)  # SERVING once the main thread serves the model (serve_models below)
    log.info("value_svc serving", extra={"grpc_port": server.port, "metrics_port": server.metrics_port,
                                         "checkpoint": loaded.checkpoint})
    from alphamath.events import follow_checkpoints

    listener = follow_checkpoints(args, server, load, "value")
    # The main thread computes every score (LocalLM.score hands them over to it).
    run_until_signal(lambda: (listener and listener.stop(), server.stop()), log,
                     work=lambda done: serve_models(done, lambda: getattr(server.servicer.loaded.value, "lm", None),
                                                   ready=lambda: server.grpc.set_serving(True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
