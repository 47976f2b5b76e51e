"""The promotion job's Kubernetes logic (trainer_svc/rollout.py), without an API server.

The pure functions are checked on the objects they build; `roll_out` runs against a fake
AppsV1Api that records every call, applies strategic-merge patches to its stored Deployments
(maps merge, as the API server does for these fields) and plays the Deployment controller one
step per read.
"""
from __future__ import annotations

import copy
from datetime import datetime, timezone

import pytest

from trainer_svc import rollout as ro

NS = "alphamath"


def deployment(name: str, checkpoint: str | None = "round-1", replicas: int = 2, serves: bool = True) -> dict:
    labels = {"app.kubernetes.io/name": name, ro.PART_OF_LABEL: ro.PART_OF}
    if serves:
        labels[ro.SERVES_CHECKPOINT_LABEL] = "true"
    tpl_ann = {ro.CHECKPOINT_ANNOTATION: checkpoint} if checkpoint else {}
    return {
        "metadata": {"name": name, "namespace": NS, "generation": 3, "labels": labels},
        "spec": {"replicas": replicas, "template": {"metadata": {"annotations": tpl_ann, "labels": {}}}},
        "status": {"observedGeneration": 3, "replicas": replicas, "updatedReplicas": replicas,
                   "availableReplicas": replicas},
    }


def merge(dst: dict, patch: dict) -> None:
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)


class FakeAppsApi:
    """Records calls; each read advances a rolling Deployment by one controller step."""

    def __init__(self, deployments: list[dict], stuck: set[str] = frozenset(), deadline: set[str] = frozenset()):
        self.store = {d["metadata"]["name"]: d for d in deployments}
        self.calls: list[tuple] = []
        self.stuck, self.deadline = set(stuck), set(deadline)

    def read_namespaced_deployment(self, name, namespace):
        self.calls.append(("read", name, namespace))
        if name not in self.store:
            raise LookupError(f"deployments.apps {name!r} not found")
        dep = self.store[name]
        self._controller_step(dep)
        return copy.deepcopy(dep)

    def patch_namespaced_deployment(self, name, namespace, body, field_manager=None, _content_type=None):
        self.calls.append(("patch", name, namespace, copy.deepcopy(body), field_manager, _content_type))
        dep = self.store[name]
        before = copy.deepcopy(dep["spec"]["template"])
        merge(dep, body)
        if dep["spec"]["template"] != before:  # a template change is a new generation: a rollout
            dep["metadata"]["generation"] += 1
            dep["status"]["updatedReplicas"] = 0
        return copy.deepcopy(dep)

    def _controller_step(self, dep):
        st, name = dep["status"], dep["metadata"]["name"]
        if st["observedGeneration"] < dep["metadata"]["generation"]:
            st["observedGeneration"] = dep["metadata"]["generation"]
            return
        if name in self.deadline:
            st["conditions"] = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                 "message": 'ReplicaSet "x" has timed out progressing.'}]
            return
        if name in self.stuck:
            return
        if st["updatedReplicas"] < dep["spec"]["replicas"]:
            st["updatedReplicas"] += 1
            st["availableReplicas"] = st["updatedReplicas"] - 1
        elif st["availableReplicas"] < st["updatedReplicas"]:
            st["availableReplicas"] = st["updatedReplicas"]

    def patches(self):
        return [c for c in self.calls if c[0] == "patch"]


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def cfg(*names, **kw):
    return ro.RolloutConfig(NS, tuple(names or ("alphamath-tgi", "alphamath-value")), poll_s=1, **kw)


# ---- pure functions ----------------------------------------------------------------------------
def test_checkpoint_patch_body():
    now = datetime(2026, 11, 1, 12, 30, 5, tzinfo=timezone.utc)
    body = ro.checkpoint_patch("round-3", previous="round-2", reason="sbs +2.1", now=now)
    assert body == {
        "metadata": {"annotations": {
            "alphamath.io/promoted-at": "2026-11-01T12:30:05Z",
            "kubernetes.io/change-cause": "alphamath promote: checkpoint round-3 (was round-2): sbs +2.1",
            "alphamath.io/previous-checkpoint": "round-2",
        }},
        "spec": {"template": {"metadata": {
            "annotations": {"alphamath.io/checkpoint": "round-3"},
            "labels": {"alphamath.io/checkpoint": "round-3"},
        }}},
    }


def test_pod_template_part_is_a_pure_function_of_the_checkpoint():
    """Same checkpoint -> same template (ReplicaSet reuse, clean `rollout undo`)."""
    a = ro.checkpoint_patch("round-3", previous="round-1", now=datetime(2026, 1, 1, tzinfo=timezone.utc))
    b = ro.checkpoint_patch("round-3", now=datetime(2027, 1, 1, tzinfo=timezone.utc))
    assert a["spec"] == b["spec"] and a["metadata"] != b["metadata"]
    assert ro.PREVIOUS_ANNOTATION not in b["metadata"]["annotations"]


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", "-round", "round-", "x" * 64, "round 3", None, 3])
def test_checkpoint_ids_are_validated(bad):
    with pytest.raises(ValueError, match="checkpoint id"):
        ro.validate_checkpoint_id(bad)
    with pytest.raises(ValueError):
        ro.checkpoint_patch(bad)


def test_checkpoint_id_from_path():
    assert ro.checkpoint_id_from_path("/checkpoints/round-3") == "round-3"
    assert ro.checkpoint_id_from_path("/data/ckpt/r7", root="/data/ckpt") == "r7"
    for bad in ("/checkpoints/round-3/policy", "/elsewhere/round-3", "/checkpoints/.."):
        with pytest.raises(ValueError):
            ro.checkpoint_id_from_path(bad)


def test_selectors():
    assert ro.target_selector() == "alphamath.io/serves-checkpoint=true,app.kubernetes.io/part-of=alphamath"
    assert ro.checkpoint_pod_selector("round-3") == "alphamath.io/checkpoint=round-3,app.kubernetes.io/part-of=alphamath"
    assert ro.parse_selector("a=b, c==d") == {"a": "b", "c": "d"}
    assert ro.matches_selector(deployment("x")["metadata"]["labels"], ro.target_selector())
    assert not ro.matches_selector(deployment("x", serves=False)["metadata"]["labels"], ro.target_selector())
    assert not ro.matches_selector(None, "a=b")
    for bad in ("a!=b", "a", "=b"):
        with pytest.raises(ValueError):
            ro.parse_selector(bad)


def test_rollout_state_follows_kubectl_rollout_status():
    d = deployment("v", replicas=3)
    assert ro.rollout_state(d).done
    assert not ro.rollout_state(d, min_generation=4).done  # patched but not yet observed
    assert "observe generation 4" in ro.rollout_state(d, min_generation=4).message
    d["status"].update(updatedReplicas=1)
    s = ro.rollout_state(d)
    assert not s.done and not s.failed and "1 of 3 replicas updated" in s.message
    d["status"].update(updatedReplicas=3, replicas=4)
    assert "1 old replicas pending termination" in ro.rollout_state(d).message
    d["status"].update(replicas=3, availableReplicas=2)
    assert "2 of 3 updated replicas available" in ro.rollout_state(d).message
    d["status"]["conditions"] = [{"type": "Progressing", "reason": "ProgressDeadlineExceeded", "message": "timed out"}]
    s = ro.rollout_state(d)
    assert s.failed and not s.done and "progress deadline exceeded: timed out" in s.message


def test_check_target_refuses_deployments_that_do_not_serve_checkpoints():
    ro.check_target(deployment("v"))
    with pytest.raises(ro.RolloutError, match="does not carry the labels"):
        ro.check_target(deployment("postgres", serves=False))
    with pytest.raises(ro.RolloutError, match="no pod-template annotation"):
        ro.check_target(deployment("v", checkpoint=None))


def test_config_from_env(tmp_path, monkeypatch):
    assert ro.RolloutConfig.from_env({}) is None  # local stack: nothing to roll
    c = ro.RolloutConfig.from_env({"ALPHAMATH_ROLLOUT_DEPLOYMENTS": " alphamath-tgi, alphamath-value ,",
                                   "ALPHAMATH_ROLLOUT_NAMESPACE": "alphamath",
                                   "ALPHAMATH_ROLLOUT_TIMEOUT_S": "600", "ALPHAMATH_ROLLOUT_ROLLBACK": "0"})
    assert c == ro.RolloutConfig("alphamath", ("alphamath-tgi", "alphamath-value"), timeout_s=600.0,
                                 rollback_on_failure=False)
    ns_file = tmp_path / "namespace"
    ns_file.write_text("team-a\n")
    monkeypatch.setattr(ro, "SERVICE_ACCOUNT_NAMESPACE_FILE", str(ns_file))
    assert ro.RolloutConfig.from_env({"ALPHAMATH_ROLLOUT_DEPLOYMENTS": "v"}).namespace == "team-a"
    monkeypatch.setattr(ro, "SERVICE_ACCOUNT_NAMESPACE_FILE", str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="ALPHAMATH_ROLLOUT_NAMESPACE is unset"):
        ro.RolloutConfig.from_env({"ALPHAMATH_ROLLOUT_DEPLOYMENTS": "v"})
    with pytest.raises(ValueError, match="not a number"):
        ro.RolloutConfig.from_env({"ALPHAMATH_ROLLOUT_DEPLOYMENTS": "v", "ALPHAMATH_ROLLOUT_NAMESPACE": "a",
                                   "ALPHAMATH_ROLLOUT_TIMEOUT_S": "soon"})
    for bad in (dict(namespace="Bad_NS", deployments=("v",)), dict(namespace="a", deployments=()),
                dict(namespace="a", deployments=("V",)), dict(namespace="a", deployments=("v", "v")),
                dict(namespace="a", deployments=("v",), timeout_s=0)):
        with pytest.raises(ValueError):
            ro.RolloutConfig(**bad)


# ---- roll_out against the fake API server ------------------------------------------------------
def test_roll_out_patches_every_target_and_waits_for_the_rollouts():
    api = FakeAppsApi([deployment("alphamath-tgi"), deployment("alphamath-value", replicas=3)])
    clock = FakeClock()
    results = ro.roll_out(api, "round-2", cfg(), reason="gate passed", clock=clock, sleep=clock.sleep)

    assert [(r.deployment, r.previous, r.checkpoint, r.patched, r.generation) for r in results] == [
        ("alphamath-tgi", "round-1", "round-2", True, 4), ("alphamath-value", "round-1", "round-2", True, 4)]
    # Every target is read (and checked) before the first patch.
    kinds = [c[0] for c in api.calls]
    assert kinds[:2] == ["read", "read"] and kinds[2:4] == ["patch", "patch"]
    for _, name, ns, body, manager, ctype in api.patches():
        assert ns == NS and manager == "alphamath-promoter"
        assert ctype == "application/strategic-merge-patch+json"
        assert body["spec"]["template"]["metadata"]["annotations"] == {ro.CHECKPOINT_ANNOTATION: "round-2"}
        assert body["metadata"]["annotations"][ro.PREVIOUS_ANNOTATION] == "round-1"
        assert "gate passed" in body["metadata"]["annotations"][ro.CHANGE_CAUSE_ANNOTATION]
    for dep in api.store.values():
        assert ro.current_checkpoint(dep) == "round-2"
        assert ro.rollout_state(dep, 4).done
    assert clock.t > 0  # it did wait for the controller


def test_roll_out_is_idempotent_for_a_retried_job():
    api = FakeAppsApi([deployment("alphamath-tgi", "round-2"), deployment("alphamath-value", "round-1")])
    results = ro.roll_out(api, "round-2", cfg(), sleep=lambda s: None)
    assert [r.patched for r in results] == [False, True]
    assert [c[1] for c in api.patches()] == ["alphamath-value"]


def test_roll_out_refuses_a_non_target_before_patching_anything():
    api = FakeAppsApi([deployment("alphamath-tgi"), deployment("alphamath-postgres", serves=False)])
    with pytest.raises(ro.RolloutError, match="alphamath-postgres does not carry"):
        ro.roll_out(api, "round-2", cfg("alphamath-tgi", "alphamath-postgres"))
    assert api.patches() == []


def test_failed_rollout_rolls_every_patched_deployment_back():
    api = FakeAppsApi([deployment("alphamath-tgi"), deployment("alphamath-value")], deadline={"alphamath-tgi"})
    with pytest.raises(ro.RolloutError, match="alphamath-tgi: progress deadline exceeded"):
        ro.roll_out(api, "round-2", cfg(), sleep=lambda s: None)
    rollbacks = api.patches()[2:]
    assert [c[1] for c in rollbacks] == ["alphamath-tgi", "alphamath-value"]
    for c in rollbacks:
        body = c[3]
        assert body["spec"]["template"]["metadata"]["annotations"][ro.CHECKPOINT_ANNOTATION] == "round-1"
        assert "rollback: round-2 did not roll out" in body["metadata"]["annotations"][ro.CHANGE_CAUSE_ANNOTATION]
    assert all(ro.current_checkpoint(d) == "round-1" for d in api.store.values())


def test_rollout_timeout_without_rollback():
    api = FakeAppsApi([deployment("alphamath-tgi"), deployment("alphamath-value")], stuck={"alphamath-value"})
    clock = FakeClock()
    with pytest.raises(ro.RolloutTimeout, match=r"not finished after 30s: alphamath-value: 0 of 2 replicas updated"):
        ro.roll_out(api, "round-2", cfg(timeout_s=30, rollback_on_failure=False), clock=clock, sleep=clock.sleep)
    assert 30 <= clock.t <= 32
    assert len(api.patches()) == 2  # no rollback patches
    assert ro.current_checkpoint(api.store["alphamath-tgi"]) == "round-2"


def test_api_errors_become_rollout_errors():
    api = FakeAppsApi([deployment("alphamath-tgi")])
    with pytest.raises(ro.RolloutError, match="cannot read deployment alphamath/alphamath-value: .*not found"):
        ro.roll_out(api, "round-2", cfg("alphamath-tgi", "alphamath-value"))
    assert api.patches() == []

    class Flaky(FakeAppsApi):
        def patch_namespaced_deployment(self, name, *a, **kw):
            if name == "alphamath-value" and not any(c[0] == "patch" and c[1] == name for c in self.calls):
                self.calls.append(("patch", name, None, None, None, None))
                raise ConnectionError("apiserver went away")
            return super().patch_namespaced_deployment(name, *a, **kw)

    api = Flaky([deployment("alphamath-tgi"), deployment("alphamath-value")])
    with pytest.raises(ro.RolloutError, match="rolling out round-2 failed: apiserver went away"):
        ro.roll_out(api, "round-2", cfg(), sleep=lambda s: None)
    assert ro.current_checkpoint(api.store["alphamath-tgi"]) == "round-1"  # rolled back


def test_roll_out_from_env():
    assert ro.roll_out_from_env("round-2", env={}) is None
    api = FakeAppsApi([deployment("alphamath-value")])
    env = {"ALPHAMATH_ROLLOUT_DEPLOYMENTS": "alphamath-value", "ALPHAMATH_ROLLOUT_NAMESPACE": NS,
           "ALPHAMATH_ROLLOUT_POLL_S": "0.001"}
    (r,) = ro.roll_out_from_env("round-2", env=env, api=api)
    assert r.patched and ro.current_checkpoint(api.store["alphamath-value"]) == "round-2"


def test_real_client_models_are_read_as_api_json():
    """The kubernetes client returns V1Deployment models: they are read in camelCase API form."""
    from kubernetes import client

    model = client.V1Deployment(
        metadata=client.V1ObjectMeta(name="alphamath-value", generation=5,
                                     labels={ro.PART_OF_LABEL: ro.PART_OF, ro.SERVES_CHECKPOINT_LABEL: "true"}),
        spec=client.V1DeploymentSpec(
            replicas=1, selector=client.V1LabelSelector(match_labels={"a": "b"}),
            template=client.V1PodTemplateSpec(metadata=client.V1ObjectMeta(annotations={ro.CHECKPOINT_ANNOTATION: "r0"}))),
        status=client.V1DeploymentStatus(observed_generation=5, replicas=1, updated_replicas=1, available_replicas=1),
    )

    class ModelApi:
        api_client = client.ApiClient()

    dep = ro._as_dict(model, ModelApi())
    ro.check_target(dep)
    assert ro.current_checkpoint(dep) == "r0" and ro.rollout_state(dep, 5).done


def test_cli_dry_run_prints_patches(capsys):
    assert ro.main(["round-4", "--dry-run", "--deployments", "alphamath-tgi,alphamath-value"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all('"contentType": "application/strategic-merge-patch+json"' in l for l in lines)
    assert ro.main(["../x", "--dry-run"]) == 1
    assert "checkpoint id" in capsys.readouterr().err
