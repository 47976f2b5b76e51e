"""The trainer's database: ingested trees, their training examples, checkpoints, training jobs.

SQLAlchemy 2 over SQLite (a file, the default) or PostgreSQL (ALPHAMATH_DB_URL, e.g.
postgresql+psycopg://postgres@127.0.0.1:5432/test). A PostgreSQL `schema` isolates one trainer
(or one test) from another in the same database.

It only persists rows: the caller (trainer_svc.ingest.store_tree) derives a tree's identity hash
and training examples (trainer_svc.examples) and hands them in. Storing is idempotent: a tree is
identified by (question_id, checkpoint, tree_hash) under a unique constraint, so a redelivered tree
(retrying producer, consumer restarted before its offset commit) is recognised and stored once,
even when two ingestors race.
"""
from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterator, Sequence

from sqlalchemy import (JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint,
                        create_engine, event, func, select, text)
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from alphamath.limits import EVENT_ID_CHARS, GROUND_TRUTH_CHARS, ID_CHARS, QUESTION_CHARS, check_id, check_text
from alphamath.paths import cache_root
from alphamath.tree import Tree
from trainer_svc.examples import Example


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class TreeRow(Base):
    __tablename__ = "trees"
    __table_args__ = (UniqueConstraint("question_id", "checkpoint", "tree_hash", name="uq_tree_identity"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    question_id: Mapped[str] = mapped_column(String(ID_CHARS), index=True)
    checkpoint: Mapped[str] = mapped_column(String(ID_CHARS), index=True)
    tree_hash: Mapped[str] = mapped_column(String(64))
    event_id: Mapped[str] = mapped_column(String(EVENT_ID_CHARS))
    question: Mapped[str] = mapped_column(Text)
    ground_truth: Mapped[str | None] = mapped_column(Text, nullable=True)
    nodes: Mapped[int] = mapped_column(Integer)
    has_correct: Mapped[bool] = mapped_column(Boolean)
    search_config: Mapped[dict] = mapped_column(JSON)
    tree_json: Mapped[str] = mapped_column(Text)
    source: Mapped[str | None] = mapped_column(String(ID_CHARS), nullable=True)  # topic[partition]@offset
    ingested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ExampleRow(Base):
    __tablename__ = "examples"
    __table_args__ = (UniqueConstraint("tree_id", "path_hash", name="uq_example_path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tree_id: Mapped[int] = mapped_column(ForeignKey("trees.id", ondelete="CASCADE"), index=True)
    question_id: Mapped[str] = mapped_column(String(ID_CHARS), index=True)
    checkpoint: Mapped[str] = mapped_column(String(ID_CHARS), index=True)
    path_hash: Mapped[str] = mapped_column(String(64))
    correct: Mapped[bool] = mapped_column(Boolean)
    payload: Mapped[dict] = mapped_column(JSON)  # Example.to_dict()


class CheckpointRow(Base):
    __tablename__ = "checkpoints"

    id: Mapped[str] = mapped_column(String(ID_CHARS), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    round: Mapped[int] = mapped_column(Integer)
    parent: Mapped[str | None] = mapped_column(String(ID_CHARS), nullable=True)
    trees: Mapped[int] = mapped_column(Integer, default=0)
    examples: Mapped[int] = mapped_column(Integer, default=0)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    promoted: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    promoted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class JobRow(Base):
    __tablename__ = "training_jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending|running|succeeded|failed
    round: Mapped[int] = mapped_column(Integer, default=0)
    base_checkpoint: Mapped[str] = mapped_column(String(ID_CHARS))
    output_checkpoint: Mapped[str | None] = mapped_column(String(ID_CHARS), nullable=True)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    policy_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    value_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    examples: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    config: Mapped[dict] = mapped_column(JSON, default=dict)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class DeadLetterRow(Base):
    __tablename__ = "dead_letters"
    __table_args__ = (UniqueConstraint("topic", "partition", "offset", name="uq_dead_letter_source"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    topic: Mapped[str] = mapped_column(String(ID_CHARS))
    partition: Mapped[int] = mapped_column(Integer)
    offset: Mapped[int] = mapped_column(Integer)
    key: Mapped[str | None] = mapped_column(String(ID_CHARS), nullable=True)
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class InvalidRecord(ValueError):
    """A tree the database can never accept (a value too long, a NUL character, a violated
    constraint): retrying cannot help, the ingestor dead-letters it."""


@dataclass
class IngestResult:
    tree_id: int
    inserted: bool  # False: this tree was already stored (a duplicate delivery)
    examples: int


def default_db_url() -> str:
    if os.environ.get("ALPHAMATH_DB_URL"):
        return os.environ["ALPHAMATH_DB_URL"]
    root = cache_root(os.environ.get("ALPHAMATH_DATA_DIR") or None)  # ALPHAMATH_DATA_DIR: the database only
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'trainer.db'}"


class Store:
    def __init__(self, url: str | None = None, schema: str | None = None, create: bool = True):
        self.url = url or default_db_url()
        self.schema = schema
        kw: dict = {"future": True, "pool_pre_ping": True}
        if self.url.startswith("sqlite"):
            kw["connect_args"] = {"timeout": 30}
        elif schema:
            if not schema.replace("_", "").isalnum():
                raise ValueError(f"schema name {schema!r} must be alphanumeric/underscore")
            kw["connect_args"] = {"options": f"-csearch_path={schema}"}
        self.engine = create_engine(self.url, **kw)
        if self.url.startswith("sqlite"):
            @event.listens_for(self.engine, "connect")
            def _sqlite_pragmas(conn, _):  # WAL: the trainer API reads while the ingestor writes
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if create:
            self.create_all()

    def create_all(self) -> None:
        if self.schema and not self.url.startswith("sqlite"):
            with self.engine.begin() as conn:
                conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'))
        Base.metadata.create_all(self.engine)

    def drop_schema(self) -> None:
        """Tests: remove everything this store created."""
        if self.schema and not self.url.startswith("sqlite"):
            with self.engine.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
        else:
            Base.metadata.drop_all(self.engine)
        self.engine.dispose()

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on any exception."""
        with self._sessions() as s, s.begin():
            yield s

    # ---- trees and examples --------------------------------------------------------------------
    def add_tree(self, tree: Tree, checkpoint: str, event_id: str = "", search_config: dict | None = None,
                 source: str | None = None, *, tree_hash: str, examples: Sequence[Example]) -> IngestResult:
        """Store a tree (identified by question, checkpoint and `tree_hash`) and its `examples` in
        one transaction; a tree already stored is a no-op.

        InvalidRecord for a tree no database of ours accepts: the limits are checked here so that
        SQLite (which ignores VARCHAR lengths) refuses what PostgreSQL would."""
        try:
            check_id("question_id", tree.question_id or "")
            check_id("checkpoint", checkpoint, required=False)
            check_id("event_id", event_id, EVENT_ID_CHARS, required=False)
            check_text("question", tree.question, QUESTION_CHARS)
            check_text("ground_truth", tree.ground_truth, GROUND_TRUTH_CHARS)
        except ValueError as e:
            raise InvalidRecord(str(e)) from None
        source = source[:ID_CHARS] if source else source
        ident = (TreeRow.question_id == tree.question_id, TreeRow.checkpoint == checkpoint,
                 TreeRow.tree_hash == tree_hash)
        with self.session() as s:
            found = s.scalar(select(TreeRow.id).where(*ident))
            if found is not None:
                return IngestResult(found, False, 0)
        try:
            with self.session() as s:
                row = TreeRow(question_id=tree.question_id, checkpoint=checkpoint, tree_hash=tree_hash,
                              event_id=event_id or uuid.uuid4().hex, question=tree.question,
                              ground_truth=tree.ground_truth, nodes=len(tree.nodes),
                              has_correct=any(e.correct for e in examples),
                              search_config=dict(search_config or {}), tree_json=tree.to_json(), source=source)
                s.add(row)
                s.flush()
                s.add_all([ExampleRow(tree_id=row.id, question_id=tree.question_id, checkpoint=checkpoint,
                                      path_hash=e.key, correct=e.correct, payload=e.to_dict()) for e in examples])
                tree_id = row.id
        except IntegrityError as e:  # another ingestor stored it between our check and insert ...
            with self.session() as s:
                found = s.scalar(select(TreeRow.id).where(*ident))
            if found is None:  # ... or some other constraint failed: this tree can never be stored
                raise InvalidRecord(f"constraint violated: {e.orig}") from e
            return IngestResult(found, False, 0)
        except DataError as e:  # a value the database refuses (length, encoding)
            raise InvalidRecord(f"value refused by the database: {e.orig}") from e
        return IngestResult(tree_id, True, len(examples))

    def record_dead_letter(self, topic: str, partition: int, offset: int, key: str | None, reason: str) -> bool:
        """Record a dead letter once (per topic/partition/offset). Values are cut and cleaned to
        what the columns take: the record that was too long must not fail here as well."""
        def clean(v: str | None, n: int | None) -> str | None:
            if v is None:
                return None
            v = v.replace("\x00", "\\x00")
            return v[:n] if n else v
        try:
            with self.session() as s:
                s.add(DeadLetterRow(topic=clean(topic, ID_CHARS), partition=partition, offset=offset,
                                    key=clean(key, ID_CHARS), reason=clean(reason, 4000)))
            return True
        except IntegrityError:
            return False

    def examples(self, checkpoint: str | None = None, limit: int | None = None) -> list[Example]:
        """Examples (of trees built by `checkpoint`, if given), in ingestion order."""
        q = select(ExampleRow.payload).order_by(ExampleRow.id)
        if checkpoint is not None:
            q = q.where(ExampleRow.checkpoint == checkpoint)
        if limit:
            q = q.limit(limit)
        with self.session() as s:
            return [Example.from_dict(p) for p in s.scalars(q)]

    def trees(self, checkpoint: str | None = None) -> list[Tree]:
        q = select(TreeRow.tree_json).order_by(TreeRow.id)
        if checkpoint is not None:
            q = q.where(TreeRow.checkpoint == checkpoint)
        with self.session() as s:
            return [Tree.from_json(t) for t in s.scalars(q)]

    def counts(self, checkpoint: str | None = None) -> dict[str, int]:
        with self.session() as s:
            def n(model, *where):
                return s.scalar(select(func.count()).select_from(model).where(*where)) or 0
            tw = (TreeRow.checkpoint == checkpoint,) if checkpoint is not None else ()
            ew = (ExampleRow.checkpoint == checkpoint,) if checkpoint is not None else ()
            return {"trees": n(TreeRow, *tw), "examples": n(ExampleRow, *ew),
                    "correct_examples": n(ExampleRow, ExampleRow.correct.is_(True), *ew),
                    "dead_letters": n(DeadLetterRow)}

    # ---- checkpoints --------------------------------------------------------------------------
    def add_checkpoint(self, id: str, path: str, round: int, parent: str | None = None, trees: int = 0,
                       examples: int = 0, metrics: dict | None = None, promoted: bool = False) -> CheckpointRow:
        """Insert or update a checkpoint record (re-running a round step rewrites it)."""
        with self.session() as s:
            row = s.get(CheckpointRow, id) or CheckpointRow(id=id)
            row.path, row.round, row.parent, row.trees, row.examples = str(path), round, parent, trees, examples
            row.metrics = dict(metrics or row.metrics or {})
            row.promoted = promoted or bool(row.promoted)
            if promoted and row.promoted_at is None:
                row.promoted_at = _now()
            s.add(row)
        return row

    def checkpoint(self, id: str) -> CheckpointRow | None:
        with self.session() as s:
            return s.get(CheckpointRow, id)

    def checkpoints(self) -> list[CheckpointRow]:
        with self.session() as s:
            return list(s.scalars(select(CheckpointRow).order_by(CheckpointRow.created_at)))

    def set_metrics(self, id: str, metrics: dict) -> None:
        with self.session() as s:
            row = s.get(CheckpointRow, id)
            if row is None:
                raise KeyError(f"unknown checkpoint {id!r}")
            row.metrics = {**(row.metrics or {}), **metrics}

    def promote(self, id: str) -> None:
        with self.session() as s:
            row = s.get(CheckpointRow, id)
            if row is None:
                raise KeyError(f"unknown checkpoint {id!r}")
            row.promoted, row.promoted_at = True, _now()

    def current_checkpoint(self) -> CheckpointRow | None:
        """The most recently promoted checkpoint."""
        with self.session() as s:
            return s.scalar(select(CheckpointRow).where(CheckpointRow.promoted.is_(True))
                            .order_by(CheckpointRow.promoted_at.desc(), CheckpointRow.round.desc()).limit(1))

    # ---- training jobs -------------------------------------------------------------------------
    def create_job(self, base_checkpoint: str, round: int, config: dict | None = None) -> JobRow:
        with self.session() as s:
            row = JobRow(id=uuid.uuid4().hex[:16], state="pending", round=round, base_checkpoint=base_checkpoint,
                         config=json.loads(json.dumps(config or {}, default=str)))
            s.add(row)
        return row

    def update_job(self, id: str, **fields) -> JobRow:
        with self.session() as s:
            row = s.get(JobRow, id)
            if row is None:
                raise KeyError(f"unknown job {id!r}")
            for k, v in fields.items():
                if not hasattr(JobRow, k):
                    raise AttributeError(f"training_jobs has no column {k!r}")
                setattr(row, k, v)
            if fields.get("state") == "running" and row.started_at is None:
                row.started_at = _now()
            if fields.get("state") in ("succeeded", "failed"):
                row.finished_at = _now()
        return row

    def job(self, id: str) -> JobRow | None:
        with self.session() as s:
            return s.get(JobRow, id)

    def latest_job(self) -> JobRow | None:
        with self.session() as s:
            return s.scalar(select(JobRow).order_by(JobRow.started_at.desc().nulls_last()).limit(1))
