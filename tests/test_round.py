"""A whole self-training round on the tiny random Llama, through the real broker and both databases."""
from __future__ import annotations

import json

from alphamath.model import VALUE_HEAD_FILE
from tests.pipeline import broker, db, topics  # noqa: F401 - fixtures
from trainer_svc.promote import EvalConfig, gate
from trainer_svc.round import RoundConfig, run_round
from trainer_svc.store import Store
from trainer_svc.train import TrainConfig

PROBLEMS = [("a1", "Tom has 3 apples and buys 2 more. How many apples does he have?", "5"),
            ("a2", "A box holds 4 pens. How many pens are in 2 boxes?", "8"),
            ("a3", "Sara had 10 sweets and ate 3. How many are left?", "7")]


def test_gate_threshold():
    assert gate({"greedy_acc": 0.5, "sbs_acc": 0.4}, {"greedy_acc": 0.5, "sbs_acc": 0.5}, 0.1).promote
    d = gate({"greedy_acc": 0.5, "sbs_acc": 0.3}, {"greedy_acc": 0.5, "sbs_acc": 0.5}, 0.1)
    assert not d.promote and "worse" in d.reasons[1]


def test_tiny_round_end_to_end(tiny_model_dir, tmp_path, broker, topics, db):
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"id": i, "question": q, "answer": a}) + "\n" for i, q, a in PROBLEMS))
    url, schema = db
    cfg = RoundConfig(k=2, eval_k=1, iterations=2, n_children=2, max_new_tokens=12, train_data=str(data),
                      eval_data=str(data), model_dir=str(tiny_model_dir), checkpoint_dir=str(tmp_path / "ckpts"),
                      bootstrap=broker.bootstrap, db_url=url, db_schema=schema, threshold=1.0, dtype="fp32",
                      topics={"trees": topics.trees, "checkpoints": topics.checkpoints, "dlq": topics.dlq},
                      train=TrainConfig(epochs=1, batch_size=8, max_len=2048),
                      eval=EvalConfig(search={"beam_b1": 1, "beam_b2": 2, "max_new_tokens": 12}))
    lines = []
    report = run_round(cfg, say=lines.append)
    assert report.round == 1 and report.base == "embedded" and report.trees == 2
    assert report.examples > 0 and report.promoted and report.reloaded
    assert {"greedy_acc", "sbs_acc", "value_acc"} <= set(report.before) & set(report.after)
    assert any(line.startswith("metric") for line in lines) and "PROMOTED" in lines[-1] + "\n".join(lines)
    store = Store(url, schema)
    try:
        cur = store.current_checkpoint()
        assert (cur.id, cur.round, cur.parent, cur.trees) == (report.candidate, 1, "embedded", 2)
        assert (tmp_path / "ckpts" / cur.id / VALUE_HEAD_FILE).is_file()
        job = store.latest_job()
        assert job.state == "succeeded" and job.output_checkpoint == cur.id and job.step == job.total_steps >= 1
        assert job.value_loss > 0  # every path reached the value head (none cut off by max_len)
        assert store.counts(cur.id)["trees"] == 0  # trees are attributed to the checkpoint that built them
    finally:
        store.close()
    if schema is not None:
        return  # the second round exercises nothing database-specific: run it once (on SQLite)
    # the next round starts from the promoted checkpoint; a strict gate keeps it if worse
    report2 = run_round(RoundConfig(**{**cfg.__dict__, "threshold": 0.0, "offset": 1}), say=lines.append)
    assert report2.round == 2 and report2.base == report.candidate
    assert report2.before["greedy_acc"] == report.after["greedy_acc"]  # cached eval of the same set


def test_trainer_service_ingests_and_runs_a_training_job(tiny_model_dir, tmp_path, broker, topics):
    import time

    import grpc

    from alphamath.pb import trainer_pb2, trainer_pb2_grpc
    from tests.pipeline import FAST_GROUP, make_tree
    from tests.test_ingest import publish
    from trainer_svc.server import TrainerServer

    store = Store(f"sqlite:///{tmp_path / 't.db'}")
    store.add_checkpoint("embedded", str(tiny_model_dir), 0, promoted=True)
    publish(broker.bootstrap, topics.trees, [make_tree("q1"), make_tree("q2")], checkpoint="embedded")
    server = TrainerServer(store, tmp_path / "ckpts", bootstrap=broker.bootstrap,
                           ingest_kwargs={"topic": topics.trees, "dlq_topic": topics.dlq,
                                          "consumer_config": FAST_GROUP},
                           defaults=TrainConfig(batch_size=4, max_len=256, dtype="fp32"))
    try:
        stub = trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        deadline = time.monotonic() + 20
        while stub.Status(trainer_pb2.StatusRequest()).ingested_trees < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        st = stub.Status(trainer_pb2.StatusRequest())
        assert (st.ingested_trees, st.examples, st.current_checkpoint) == (2, 4, "embedded")
        with __import__("pytest").raises(grpc.RpcError) as err:
            stub.StartTraining(trainer_pb2.StartTrainingRequest(batch_size=0))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        job = stub.StartTraining(trainer_pb2.StartTrainingRequest(epochs=2))
        assert job.base_checkpoint == "embedded" and job.round == 1
        server.servicer.wait(60)
        st = stub.Status(trainer_pb2.StatusRequest())
        assert st.current_job.state == trainer_pb2.JOB_STATE_SUCCEEDED, st.current_job.error
        assert st.current_job.step == st.current_job.total_steps == 2 and st.current_job.HasField("loss")
        cand = [c for c in st.checkpoints if c.id == st.current_job.output_checkpoint][0]
        assert (cand.parent, cand.trees, cand.examples, cand.promoted) == ("embedded", 2, 4, False)
    finally:
        server.stop()
        store.close()
