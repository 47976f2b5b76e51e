"""`python -m trainer_svc`: TrainerService (gRPC) + tree ingestion from Kafka + training jobs.

    python -m trainer_svc --kafka-bootstrap 127.0.0.1:9092 --db-url sqlite:///trainer.db
Every flag can be set as ALPHAMATH_TRAINER_<FLAG> or ALPHAMATH_<FLAG> (see --help).
"""
from __future__ import annotations

import logging
import sys

from alphamath.broker import DLQ_TOPIC, TREES_TOPIC
from alphamath.service import configure_threads, parse_config, run_until_signal, service_parser, setup_logging
from trainer_svc.registry import checkpoint_root

log = logging.getLogger("trainer_svc")


def build_parser():
    p = service_parser("trainer", __doc__.splitlines()[0])
    p.add_argument("--kafka-bootstrap", default="127.0.0.1:9092", help="Kafka bootstrap servers")
    p.add_argument("--db-url", default=None, help="SQLAlchemy URL (default: SQLite in the cache dir)")
    p.add_argument("--db-schema", default=None, help="PostgreSQL schema")
    p.add_argument("--checkpoint-dir", default=str(checkpoint_root()), help="where trained checkpoints go")
    p.add_argument("--no-ingest", dest="ingest", action="store_false", help="do not consume trees")
    p.add_argument("--trees-topic", default=TREES_TOPIC, help="topic the trees are consumed from")
    p.add_argument("--dlq-topic", default=DLQ_TOPIC, help="dead-letter topic for records that cannot be stored")
    p.add_argument("--ingest-retry-budget", type=float, default=300.0,
                   help="seconds of consecutive transient errors (database/broker down) before the trainer "
                        "exits with status 1")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--learning-rate", type=float, default=2e-5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    return p


def main(argv=None) -> int:
    from trainer_svc.server import TrainerServer
    from trainer_svc.store import Store
    from trainer_svc.train import TrainConfig

    args = parse_config(build_parser(), argv)
    setup_logging("trainer", args.log_level)
    configure_threads()
    store = Store(args.db_url, args.db_schema)
    server = TrainerServer(store, args.checkpoint_dir, port=args.port, host=args.host,
                           metrics_port=args.metrics_port, bootstrap=args.kafka_bootstrap, ingest=args.ingest,
                           ingest_kwargs={"topic": args.trees_topic, "dlq_topic": args.dlq_topic,
                                          "retry_budget_s": args.ingest_retry_budget},
                           defaults=TrainConfig(epochs=args.epochs, learning_rate=args.learning_rate,
                                                batch_size=args.batch_size, grad_accum=args.grad_accum))
    log.info("trainer service ready", extra={"port": server.port, "metrics_port": server.metrics_port,
                                             "db": store.url.split("@")[-1], "ingest": args.ingest})

    def watch(done):
        """The main thread waits for a signal or for the ingest thread's death (then exit 1)."""
        while not done.wait(0.5):
            if server.failed.is_set():
                done.set()

    run_until_signal(server.stop, log, work=watch)
    store.close()
    if server.failed.is_set():
        log.critical("exiting with status 1: %s", server.failure)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
