"""The promotion job (`python -m trainer_svc.promote`): which candidate it judges, and the order of
rollout, announcement and promotion. Real store (SQLite), the real rollout code against the fake
AppsV1Api of test_rollout, a recording publisher; evaluations come from the store's cache (the
model-level evaluation is covered by test_round), except where the test is about the sandbox the
evaluation's code cells run in (a real SandboxServer on loopback, scripted policy, no model)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from alphamath.data import load_problems
from alphamath.interfaces import ExecResult
from alphamath.runtime import Engine
from alphamath.steps import STEP_OPEN
from alphamath.sandbox.executor import Limits
from sandbox_svc.server import SandboxServer
from alphamath.remote import RemoteSandbox
from tests.fakes import ConstValue, sample
from tests.test_rollout import FakeAppsApi, deployment
from trainer_svc import rollout as ro
from trainer_svc.promote import VERDICT, EvalConfig, eval_fingerprint, main, promote_next
from trainer_svc.store import Store

PROBLEMS = [("a1", "Tom has 3 apples and buys 2 more. How many apples does he have?", "5"),
            ("a2", "A box holds 4 pens. How many pens are in 2 boxes?", "8")]
TARGETS = ("alphamath-policy", "alphamath-value")


class RecordingPublisher:
    """Stands in for CheckpointPublisher; notes whether the store already said "promoted"."""

    def __init__(self, store: Store, log: list):
        self.store, self.log, self.events = store, log, []

    def publish(self, checkpoint_id, path, round, parent=None, metrics=None):
        self.events.append({"id": checkpoint_id, "path": path, "round": round, "parent": parent,
                            "metrics": dict(metrics or {})})
        self.log.append(("publish", checkpoint_id, self.store.checkpoint(checkpoint_id).promoted))


def no_engine(path):
    raise AssertionError(f"evaluation should have come from the cache, not by loading {path}")


@pytest.fixture
def problems(tmp_path):
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"id": i, "question": q, "answer": a}) + "\n" for i, q, a in PROBLEMS))
    return data, load_problems(data)


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'trainer.db'}")
    yield s
    s.close()


def seed(store: Store, problems, candidate_acc=(0.5, 0.5), cfg: EvalConfig | None = None) -> str:
    """The promoted `embedded` checkpoint and a round-1 candidate, both already evaluated."""
    fp = eval_fingerprint(problems, cfg or EvalConfig())
    store.add_checkpoint("embedded", "/checkpoints/embedded", 0, promoted=True,
                         metrics={"greedy_acc": 0.5, "sbs_acc": 0.5, "value_acc": 0.4, "eval_set": fp})
    store.add_checkpoint("round-1-abc", "/checkpoints/round-1-abc", 1, parent="embedded", trees=3, examples=7,
                         metrics={"greedy_acc": candidate_acc[0], "sbs_acc": candidate_acc[1], "value_acc": 0.6,
                                  "eval_set": fp})
    return "round-1-abc"


def k8s_rollout(api, log):
    env = {"ALPHAMATH_ROLLOUT_DEPLOYMENTS": ",".join(TARGETS), "ALPHAMATH_ROLLOUT_NAMESPACE": "alphamath",
           "ALPHAMATH_ROLLOUT_POLL_S": "0.001"}

    def roll_out(checkpoint, reason=None):
        log.append(("rollout", checkpoint, None))
        return ro.roll_out_from_env(checkpoint, reason=reason, env=env, api=api)
    return roll_out


def test_failed_rollout_neither_promotes_nor_announces_and_the_next_run_retries(store, problems):
    _, probs = problems
    cand = seed(store, probs)
    log: list = []
    pub = RecordingPublisher(store, log)
    api = FakeAppsApi([deployment(n, checkpoint="embedded") for n in TARGETS], deadline={"alphamath-policy"})
    with pytest.raises(ro.RolloutError, match="progress deadline exceeded"):
        promote_next(store, probs, engine_factory=no_engine, publisher=pub, roll_out=k8s_rollout(api, log))
    assert log == [("rollout", cand, None)] and pub.events == []
    assert not store.checkpoint(cand).promoted and store.current_checkpoint().id == "embedded"
    assert VERDICT not in store.checkpoint(cand).metrics  # no verdict: the next run judges it again
    assert all(ro.current_checkpoint(d) == "embedded" for d in api.store.values())  # rolled back

    api.deadline.clear()  # the cluster recovered: the next CronJob run finishes the promotion
    for d in api.store.values():
        d["status"].pop("conditions", None)
    res = promote_next(store, probs, engine_factory=no_engine, publisher=pub, roll_out=k8s_rollout(api, log))
    assert (res.outcome, res.candidate, res.current) == ("promoted", cand, "embedded")
    assert [r.deployment for r in res.rolled_out] == list(TARGETS)
    assert all(ro.current_checkpoint(d) == cand for d in api.store.values())
    # rolled out first, then announced (not yet marked), then marked promoted
    assert log[1:] == [("rollout", cand, None), ("publish", cand, False)]
    assert store.checkpoint(cand).promoted and store.current_checkpoint().id == cand
    (ev,) = pub.events
    assert (ev["path"], ev["round"], ev["parent"]) == ("/checkpoints/round-1-abc", 1, "embedded")
    assert ev["metrics"]["greedy_acc"] == 0.5 and "eval_set" not in ev["metrics"]
    # nothing left to judge
    assert promote_next(store, probs, engine_factory=no_engine, publisher=pub).outcome == "none"


def test_outside_kubernetes_promotes_and_announces(store, problems, monkeypatch):
    monkeypatch.delenv("ALPHAMATH_ROLLOUT_DEPLOYMENTS", raising=False)
    _, probs = problems
    cand = seed(store, probs)
    log: list = []
    pub = RecordingPublisher(store, log)
    res = promote_next(store, probs, engine_factory=no_engine, publisher=pub)  # real roll_out_from_env: None
    assert res.outcome == "promoted" and res.rolled_out is None
    assert [e["id"] for e in pub.events] == [cand] and store.current_checkpoint().id == cand


def test_rejected_candidate_is_not_rolled_out_and_gets_a_verdict(store, problems):
    _, probs = problems
    cand = seed(store, probs, candidate_acc=(0.5, 0.0))
    log: list = []
    pub = RecordingPublisher(store, log)
    res = promote_next(store, probs, threshold=0.1, engine_factory=no_engine, publisher=pub,
                       roll_out=lambda c, reason=None: log.append(("rollout", c, None)))
    assert res.outcome == "rejected" and not res.decision.promote and "worse" in res.decision.reasons[1]
    assert log == [] and pub.events == []
    assert store.checkpoint(cand).metrics[VERDICT] == "rejected" and store.current_checkpoint().id == "embedded"
    assert promote_next(store, probs, engine_factory=no_engine, publisher=pub).outcome == "none"


def test_candidate_choice(store, problems):
    _, probs = problems
    seed(store, probs)
    # a newer candidate of the same base is judged first; one trained from another base is stale
    store.add_checkpoint("round-1-def", "/checkpoints/round-1-def", 1, parent="embedded")
    store.add_checkpoint("round-2-old", "/checkpoints/round-2-old", 2, parent="round-0-other")
    from trainer_svc.promote import next_candidate

    cur = store.current_checkpoint()
    assert next_candidate(store, cur).id == "round-1-def"
    assert next_candidate(store, cur, "round-1-abc").id == "round-1-abc"
    with pytest.raises(ValueError, match="already promoted"):
        next_candidate(store, cur, "embedded")
    with pytest.raises(ValueError, match="unknown candidate"):
        next_candidate(store, cur, "nope")
    empty = Store(store.url + ".empty")
    try:
        with pytest.raises(ValueError, match="no promoted checkpoint"):
            promote_next(empty, probs, engine_factory=no_engine)
    finally:
        empty.close()


def test_cli_failed_rollout_exits_nonzero_and_leaves_the_candidate(store, problems, monkeypatch, capsys):
    data, probs = problems
    cand = seed(store, probs)  # cached with the CLI's default EvalConfig
    api = FakeAppsApi([deployment(n, checkpoint="embedded") for n in TARGETS], deadline={"alphamath-value"})
    monkeypatch.setattr(ro, "apps_api", lambda: api)
    for k, v in {"ALPHAMATH_ROLLOUT_DEPLOYMENTS": ",".join(TARGETS), "ALPHAMATH_ROLLOUT_NAMESPACE": "alphamath",
                 "ALPHAMATH_ROLLOUT_POLL_S": "0.001", "ALPHAMATH_DB_URL": store.url,
                 "ALPHAMATH_EVAL_DATA": str(data), "ALPHAMATH_EVAL_K": "2",
                 "ALPHAMATH_KAFKA_BOOTSTRAP": "127.0.0.1:1"}.items():  # never reached: nothing is published
        monkeypatch.setenv(k, v)
    assert main([]) == 1
    err = capsys.readouterr().err
    assert "rollout failed, the candidate stays unpromoted" in err and "alphamath-value" in err
    assert not store.checkpoint(cand).promoted and store.current_checkpoint().id == "embedded"
    assert all(ro.current_checkpoint(d) == "embedded" for d in api.store.values())

    store.set_metrics(cand, {VERDICT: "rejected"})
    assert main([]) == 0 and "nothing to promote" in capsys.readouterr().out
    assert main(["--eval-data", str(data.with_name("missing.jsonl"))]) == 2
    assert main(["--eval-k", "0"]) == 2


# ---- --sandbox-addr: code cells on the sandbox service ----------------------------------------------
class RecordingExecutor:
    """The sandbox server's executor: records the cells it is asked to run and answers a fixed
    table (no code is executed in the test process)."""

    limits = Limits(timeout_s=5.0)
    OUTPUTS = {"print(3 + 2)": "5\n"}

    def __init__(self):
        self.calls: list[list[str]] = []

    def execute(self, cells):
        self.calls.append(list(cells))
        return ExecResult(stdout=self.OUTPUTS.get(cells[-1], ""), duration_s=0.001)


class CodeThenAnswerPolicy:
    """Writes one code step, then answers with what the code printed: the answer is right only if
    the sandbox's output reached the state. With `uses_code=False` it answers 4 at once (a worse
    candidate, so the gate rejects it and nothing is published)."""

    CODE = "Add the apples.\n<code>\nprint(3 + 2)\n</code>"

    def __init__(self, uses_code: bool = True):
        self.uses_code = uses_code

    def render_prompt(self, question):
        return f"Q: {question}\n{STEP_OPEN}"

    def generate(self, prompts, n, *, stop, temperature, top_p=1.0, max_new_tokens=256, seed=None):
        out = []
        for p in prompts:
            outputs = re.findall(r"<output>\n?(.*?)\n?</output>", p, re.S)
            if not self.uses_code:
                text = "So the answer is \\boxed{4}.</step>"
            elif not outputs:
                text = self.CODE
            else:
                text = f"So the answer is \\boxed{{{outputs[-1].strip()}}}.</step>"
            out.append([sample(text, prior=0.9)] * n)
        return out


def test_cli_sandbox_addr_runs_code_cells_on_the_sandbox_service(store, problems, monkeypatch, capsys):
    import trainer_svc.promote as promote

    data, _ = problems
    store.add_checkpoint("embedded", "/checkpoints/embedded", 0, promoted=True)  # not yet evaluated
    store.add_checkpoint("round-1-abc", "/checkpoints/round-1-abc", 1, parent="embedded")
    executor = RecordingExecutor()
    server = SandboxServer(executor, port=0, max_concurrency=2)
    loaded: list[tuple[str, object]] = []

    def load_engine(path, dtype, device, sandbox):
        """Stands in for alphamath.runtime.load_engine: no model; the sandbox is what main passes."""
        assert sandbox is not None, "main must pass the remote sandbox, not fall back to a local executor"
        loaded.append((path, sandbox))
        policy = CodeThenAnswerPolicy(uses_code=path.endswith("embedded"))
        return Engine(policy, ConstValue(0.1), sandbox, None, Path(path))

    monkeypatch.setattr(promote, "load_engine", load_engine)
    monkeypatch.delenv("ALPHAMATH_ROLLOUT_DEPLOYMENTS", raising=False)
    for k, v in {"ALPHAMATH_DB_URL": store.url, "ALPHAMATH_EVAL_DATA": str(data), "ALPHAMATH_EVAL_K": "1",
                 "ALPHAMATH_ALPHA": "1",  # one problem can never be significant: gate on the drop alone
                 "ALPHAMATH_KAFKA_BOOTSTRAP": "127.0.0.1:1",  # never reached: the candidate is rejected
                 "ALPHAMATH_SANDBOX_ADDR": f"127.0.0.1:{server.port}"}.items():
        monkeypatch.setenv(k, v)
    try:
        assert main([]) == 0
    finally:
        server.stop(0)
    assert "outcome: rejected (round-1-abc)" in capsys.readouterr().out
    # Both evaluations got the one remote sandbox, connected to the address from the environment.
    assert [p for p, _ in loaded] == ["/checkpoints/embedded", "/checkpoints/round-1-abc"]
    (sandbox,) = {id(s): s for _, s in loaded}.values()
    assert isinstance(sandbox, RemoteSandbox) and sandbox.ep.addr == f"127.0.0.1:{server.port}"
    # The current checkpoint's code cell ran on the server (greedy once, SBS per beam), and its
    # output came back into the states: the answers built from it are right.
    assert executor.calls and all(c == ["print(3 + 2)"] for c in executor.calls)
    assert sandbox.scope.calls["sandbox"] == len(executor.calls)
    current, cand = store.checkpoint("embedded").metrics, store.checkpoint("round-1-abc").metrics
    assert current["greedy_acc"] == 1.0 and current["sbs_acc"] == 1.0
    assert cand["greedy_acc"] == 0.0 and cand[VERDICT] == "rejected"



def test_cli_sandbox_choice(store, problems, monkeypatch, capsys):
    """No address: load_engine gets no sandbox (it builds the local Executor, as before); the flag
    wins over the environment; a malformed address is a usage error before anything loads."""
    import trainer_svc.promote as promote

    data, _ = problems
    store.add_checkpoint("embedded", "/checkpoints/embedded", 0, promoted=True)  # needs an evaluation
    store.add_checkpoint("round-1-abc", "/checkpoints/round-1-abc", 1, parent="embedded")
    given = []

    def load_engine(path, dtype, device, sandbox):
        given.append(sandbox)
        raise RuntimeError("stop after choosing the sandbox")

    monkeypatch.setattr(promote, "load_engine", load_engine)
    for k, v in {"ALPHAMATH_DB_URL": store.url, "ALPHAMATH_EVAL_DATA": str(data), "ALPHAMATH_EVAL_K": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("ALPHAMATH_SANDBOX_ADDR", raising=False)
    monkeypatch.delenv("ALPHAMATH_PROMOTE_SANDBOX_ADDR", raising=False)
    assert main([]) == 2 and given == [None]
    monkeypatch.setenv("ALPHAMATH_SANDBOX_ADDR", "alphamath-sandbox:50054")
    assert main(["--sandbox-addr", "127.0.0.1:1"]) == 2
    assert isinstance(given[-1], RemoteSandbox) and given[-1].ep.addr == "127.0.0.1:1"
    assert main([]) == 2 and given[-1].ep.addr == "alphamath-sandbox:50054"
    assert "stop after choosing the sandbox" in capsys.readouterr().err
    assert main(["--sandbox-addr", "alphamath-sandbox"]) == 2 and len(given) == 3
    assert "--sandbox-addr must be HOST:PORT" in capsys.readouterr().err


def test_a_stored_evaluation_is_not_reused_after_the_prompt_changed(problems, monkeypatch):
    """The round-0 prompt's worked examples are part of what an accuracy was measured on."""
    import alphamath.steps as steps

    _, loaded = problems
    before = eval_fingerprint(loaded, EvalConfig())
    assert eval_fingerprint(loaded, EvalConfig()) == before
    monkeypatch.setattr(steps, "FEW_SHOT", steps.FEW_SHOT[:1])
    assert eval_fingerprint(loaded, EvalConfig()) != before
