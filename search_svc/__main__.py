"""`python -m search_svc`: run SearchService (flags / ALPHAMATH_SEARCH_* variables; --help)."""
from __future__ import annotations

import logging
import sys

from alphamath.remote import RetryPolicy
from alphamath.service import GRPC_PORTS, parse_config, run_until_signal, service_parser, setup_logging
from search_svc.server import SearchServer, SearchServerConfig

log = logging.getLogger("search_svc")


def build_parser():
    p = service_parser("search", "SearchService: greedy / SBS / MCTS / majority search over the policy, "
                                 "value and sandbox services.")
    p.add_argument("--policy-addr", default=f"127.0.0.1:{GRPC_PORTS['policy']}", help="PolicyService address")
    p.add_argument("--value-addr", default=f"127.0.0.1:{GRPC_PORTS['value']}", help="ValueService address")
    p.add_argument("--sandbox-addr", default=f"127.0.0.1:{GRPC_PORTS['sandbox']}", help="SandboxService address")
    d = SearchServerConfig()
    p.add_argument("--max-active", type=int, default=d.max_active, help="searches running at once")
    p.add_argument("--max-queued", type=int, default=d.max_queued,
                   help="searches waiting for a slot; beyond this RESOURCE_EXHAUSTED")
    p.add_argument("--batch-concurrency", type=int, default=d.batch_concurrency,
                   help="GenerateTrees questions searched at once when the request says 0")
    p.add_argument("--max-request-s", type=float, default=d.max_request_s,
                   help="deadline of a search whose client set none")
    r = RetryPolicy()
    p.add_argument("--retry-budget-s", type=float, default=r.retry_budget_s,
                   help="how long an UNAVAILABLE/RESOURCE_EXHAUSTED dependency is retried before UNAVAILABLE")
    p.add_argument("--call-timeout-s", type=float, default=r.call_timeout_s,
                   help="timeout of one policy/value call (sandbox: at most 60 s)")
    p.add_argument("--kafka-bootstrap", default="",
                   help="Kafka bootstrap servers; GenerateTrees publishes finished trees there (empty: no publishing)")
    return p


def main(argv=None) -> int:
    args = parse_config(build_parser(), argv)
    setup_logging("search", args.log_level)
    cfg = SearchServerConfig(max_active=args.max_active, max_queued=args.max_queued,
                             batch_concurrency=args.batch_concurrency, max_request_s=args.max_request_s)
    if min(cfg.max_active, cfg.batch_concurrency) < 1 or cfg.max_queued < 0:
        raise SystemExit("--max-active and --batch-concurrency must be >= 1, --max-queued >= 0")
    publisher = None
    if args.kafka_bootstrap:
        from alphamath.events import TreePublisher
        publisher = TreePublisher(args.kafka_bootstrap)
    retry = RetryPolicy(call_timeout_s=args.call_timeout_s, retry_budget_s=args.retry_budget_s)
    server = SearchServer(policy_addr=args.policy_addr, value_addr=args.value_addr,
                          sandbox_addr=args.sandbox_addr, port=args.port, host=args.host,
                          metrics_port=args.metrics_port, config=cfg, retry=retry, publisher=publisher,
                          max_workers=args.max_workers)
    log.info("search service ready", extra={"port": server.port, "metrics_port": server.metrics_port,
                                            "dependencies": server.deps.addrs,
                                            "publishing": bool(publisher)})
    run_until_signal(server.stop, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
