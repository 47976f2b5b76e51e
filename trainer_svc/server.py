"""TrainerService: ingestion and training status, and training jobs on demand.

The server runs the tree ingestor (consumer group alphamath-trainer) in a background thread and
runs at most one training job at a time in another: StartTraining returns the job at once
(PENDING/RUNNING) and Status reports its progress and loss as it goes. A job trains the base
checkpoint (default: the latest promoted one) on the examples of the trees that checkpoint built,
and records the candidate checkpoint; promotion is the gate's decision (trainer_svc.promote).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import asdict, replace
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from alphamath.pb import trainer_pb2, trainer_pb2_grpc
from trainer_svc.store import CheckpointRow, JobRow, Store
from trainer_svc.train import TrainConfig, train_next_round

log = logging.getLogger(__name__)
_STATES = {"pending": trainer_pb2.JOB_STATE_PENDING, "running": trainer_pb2.JOB_STATE_RUNNING,
           "succeeded": trainer_pb2.JOB_STATE_SUCCEEDED, "failed": trainer_pb2.JOB_STATE_FAILED}


def _ts(dt) -> Timestamp | None:
    if dt is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(dt)
    return ts


def job_to_pb(j: JobRow) -> trainer_pb2.TrainingJob:
    m = trainer_pb2.TrainingJob(id=j.id, state=_STATES.get(j.state, 0), round=j.round,
                                base_checkpoint=j.base_checkpoint, step=j.step, total_steps=j.total_steps,
                                examples=j.examples)
    for name in ("output_checkpoint", "loss", "policy_loss", "value_loss", "error"):
        if getattr(j, name) is not None:
            setattr(m, name, getattr(j, name))
    for name in ("started_at", "finished_at"):
        ts = _ts(getattr(j, name))
        if ts is not None:
            getattr(m, name).CopyFrom(ts)
    return m


def checkpoint_to_pb(c: CheckpointRow) -> trainer_pb2.CheckpointInfo:
    m = trainer_pb2.CheckpointInfo(id=c.id, path=c.path, round=c.round, trees=c.trees, examples=c.examples,
                                   promoted=bool(c.promoted),
                                   metrics={k: float(v) for k, v in (c.metrics or {}).items()
                                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
    if c.parent:
        m.parent = c.parent
    if c.created_at is not None:
        m.created_at.CopyFrom(_ts(c.created_at))
    return m


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, store: Store, checkpoint_dir: str | Path, defaults: TrainConfig | None = None):
        self.store, self.checkpoint_dir = store, Path(checkpoint_dir)
        self.defaults = defaults or TrainConfig()
        self._lock = threading.Lock()
        self._job_thread: threading.Thread | None = None
        self._job_id: str | None = None

    def Status(self, request, context):
        counts = self.store.counts()
        resp = trainer_pb2.StatusResponse(ingested_trees=counts["trees"], examples=counts["examples"],
                                          dead_letters=counts["dead_letters"],
                                          checkpoints=[checkpoint_to_pb(c) for c in self.store.checkpoints()])
        cur = self.store.current_checkpoint()
        if cur is not None:
            resp.current_checkpoint = cur.id
        job = self.store.job(self._job_id) if self._job_id else self.store.latest_job()
        if job is not None:
            resp.current_job.CopyFrom(job_to_pb(job))
        return resp

    def StartTraining(self, request, context):
        import grpc

        overrides = {f: getattr(request, f) for f in ("epochs", "learning_rate", "batch_size", "grad_accum",
                                                      "value_loss_weight", "max_examples", "seed")
                     if request.HasField(f)}
        try:
            cfg = replace(self.defaults, **overrides).validate()
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        base = self.store.checkpoint(request.base_checkpoint) if request.HasField("base_checkpoint") \
            else self.store.current_checkpoint()
        if base is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION if not request.HasField("base_checkpoint")
                          else grpc.StatusCode.NOT_FOUND,
                          f"unknown base checkpoint {request.base_checkpoint!r}" if request.HasField("base_checkpoint")
                          else "no promoted checkpoint yet; name base_checkpoint")
        rnd = request.round if request.HasField("round") else base.round + 1
        with self._lock:
            if self._job_thread is not None and self._job_thread.is_alive():
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"job {self._job_id} is still running")
            job = self.store.create_job(base.id, rnd, asdict(cfg))
            self._job_id = job.id
            self._job_thread = threading.Thread(target=self._run_job, args=(job.id, base, rnd, cfg),
                                                name=f"train-{job.id}", daemon=True)
            self._job_thread.start()
        return job_to_pb(self.store.job(job.id))

    def _run_job(self, job_id: str, base: CheckpointRow, rnd: int, cfg: TrainConfig) -> None:
        try:
            cand = train_next_round(self.store, self.checkpoint_dir, cfg, base=base, rnd=rnd, job_id=job_id)
            log.info("training job %s produced %s", job_id, cand.id)
        except Exception:  # noqa: BLE001 - train_next_round marked the job failed; Status reports it
            log.exception("training job %s failed", job_id)

    def wait(self, timeout_s: float | None = None) -> None:
        if self._job_thread is not None:
            self._job_thread.join(timeout_s)


class TrainerServer:
    """gRPC server (health, reflection, metrics) + background ingestion.

    If the ingest thread ends by an error (see trainer_svc.ingest: unexpected errors, or transient
    ones beyond the retry budget), health turns NOT_SERVING, `failed` is set and `on_fatal(reason)`
    is called: `python -m trainer_svc` then exits non-zero, so Kubernetes restarts the trainer
    instead of leaving a server that looks healthy and ingests nothing."""

    def __init__(self, store: Store, checkpoint_dir: str | Path, *, port: int = 0, host: str = "127.0.0.1",
                 metrics_port: int = -1, bootstrap: str | None = None, ingest: bool = True,
                 defaults: TrainConfig | None = None, ingest_kwargs: dict | None = None,
                 on_fatal=None):
        from alphamath.service import GrpcServer, ServiceMetrics

        self.failed = threading.Event()
        self.failure: str | None = None
        self.on_fatal = on_fatal

        self.servicer = TrainerServicer(store, checkpoint_dir, defaults)
        self.metrics = ServiceMetrics("trainer")
        self.metrics_port = self.metrics.serve(metrics_port, host) if metrics_port >= 0 else None
        self.grpc = GrpcServer(lambda s: trainer_pb2_grpc.add_TrainerServiceServicer_to_server(self.servicer, s),
                               ["alphamath.v1.TrainerService"], port=port, host=host, metrics=self.metrics,
                               max_workers=8)
        self.port = self.grpc.port
        self.ingestor = None
        self._ingest_thread = None
        if ingest:
            from trainer_svc.ingest import Ingestor
            self.ingestor = Ingestor(store, bootstrap, **(ingest_kwargs or {}))
            self._ingest_thread = threading.Thread(target=self._ingest, name="ingest", daemon=True)
            self._ingest_thread.start()

    def _ingest(self) -> None:
        try:
            self.ingestor.run()
            return
        except BaseException as e:  # noqa: BLE001 - any end of this thread but stop() is fatal
            self.failure = f"the ingest thread died: {type(e).__name__}: {e}"
        log.critical("%s; reporting NOT_SERVING", self.failure, exc_info=True)
        self.grpc.set_serving(False)
        self.failed.set()
        if self.on_fatal is not None:
            self.on_fatal(self.failure)

    def stop(self) -> None:
        self.grpc.stop()
        if self.ingestor is not None:
            self.ingestor.stop()
            self._ingest_thread.join(10)
            self.ingestor.close()
        self.metrics.stop()
