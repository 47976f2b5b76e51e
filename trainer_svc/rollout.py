"""Roll the checkpoint-serving Deployments (TGI fleet, value_svc) to a promoted checkpoint.

In Kubernetes a TGI pod cannot hot-swap its weights, so promotion is a rollout. The serving
pods read the checkpoint they load from their own pod-template annotation
`alphamath.io/checkpoint` (downward API -> MODEL_ID / ALPHAMATH_MODEL_DIR, see k8s/), so one
strategic-merge patch of that annotation both starts the rolling update and names the model:

* the pod template stays a pure function of the checkpoint id (no timestamps in it), so
  re-promoting a checkpoint that was served before reuses its ReplicaSet, and
  `kubectl rollout undo` restores the previous model along with the pods;
* the previous checkpoint and a change-cause are recorded on the Deployment's own metadata
  (`kubectl rollout history` shows the change-cause per revision).

The promotion job's ServiceAccount may only `get` and `patch` the named Deployments
(k8s/base/promote.yaml), so everything here is get + patch: no list, no watch.

Pure functions build the objects (patch bodies, selectors, rollout state) and are unit-tested;
`roll_out` is the thin part that talks to the API server through the `kubernetes` client.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Any, Callable, Mapping, Sequence

log = logging.getLogger(__name__)

CHECKPOINT_ANNOTATION = "alphamath.io/checkpoint"  # pod template: the checkpoint its pods serve
CHECKPOINT_LABEL = "alphamath.io/checkpoint"  # same id as a label: `kubectl get pods -l ...`
PREVIOUS_ANNOTATION = "alphamath.io/previous-checkpoint"  # Deployment: what it served before
PROMOTED_AT_ANNOTATION = "alphamath.io/promoted-at"  # Deployment: when (kept off the template)
CHANGE_CAUSE_ANNOTATION = "kubernetes.io/change-cause"  # shown by `kubectl rollout history`
SERVES_CHECKPOINT_LABEL = "alphamath.io/serves-checkpoint"
PART_OF_LABEL = "app.kubernetes.io/part-of"
PART_OF = "alphamath"
# The client's default for a dict body would be JSON Patch (RFC 6902), which a dict is not.
PATCH_CONTENT_TYPE = "application/strategic-merge-patch+json"
FIELD_MANAGER = "alphamath-promoter"
DEFAULT_TIMEOUT_S = 1800.0
DEFAULT_POLL_S = 5.0
SERVICE_ACCOUNT_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

# A label value (<= 63 chars, alphanumeric at both ends): also a safe single path component.
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class RolloutError(RuntimeError):
    """The Deployments could not be rolled to the checkpoint (the job must fail, not promote)."""


class RolloutTimeout(RolloutError):
    """A rollout did not complete within the deadline."""


# ---- pure functions: ids, selectors, patch bodies, rollout state ------------------------------
def validate_checkpoint_id(checkpoint: str) -> str:
    """A checkpoint id is a directory name under the checkpoint root and a label value."""
    if not isinstance(checkpoint, str) or not _LABEL_VALUE.match(checkpoint):
        raise ValueError(
            f"checkpoint id {checkpoint!r} is not usable: it must be 1-63 characters of "
            "[A-Za-z0-9._-], start and end alphanumeric (a directory name under the checkpoint "
            "root and a Kubernetes label value)"
        )
    return checkpoint


def checkpoint_id_from_path(path: str | os.PathLike, root: str | os.PathLike = "/checkpoints") -> str:
    """`/checkpoints/round-3` -> `round-3`; refuses paths that are not directly under the root."""
    p, r = PurePosixPath(os.fspath(path)), PurePosixPath(os.fspath(root))
    if p.parent != r:
        raise ValueError(f"checkpoint {str(p)!r} is not a directory directly under {str(r)!r}")
    return validate_checkpoint_id(p.name)


def format_selector(labels: Mapping[str, str]) -> str:
    """Equality-based label selector string, keys sorted (stable for logs and tests)."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def parse_selector(selector: str) -> dict[str, str]:
    """Inverse of `format_selector` (equality terms only: `a=b` or `a==b`)."""
    out: dict[str, str] = {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, sep, value = term.replace("==", "=").partition("=")
        if not sep or not key or "!" in key:
            raise ValueError(f"unsupported selector term {term!r}: only key=value terms")
        out[key.strip()] = value.strip()
    return out


def matches_selector(labels: Mapping[str, str] | None, selector: str) -> bool:
    labels = labels or {}
    return all(labels.get(k) == v for k, v in parse_selector(selector).items())


def target_selector() -> str:
    """Labels every Deployment this job may roll must carry (checked before patching)."""
    return format_selector({PART_OF_LABEL: PART_OF, SERVES_CHECKPOINT_LABEL: "true"})


def checkpoint_pod_selector(checkpoint: str) -> str:
    """Pods serving `checkpoint`: `kubectl get pods -l <this>` shows a round's progress."""
    return format_selector({PART_OF_LABEL: PART_OF, CHECKPOINT_LABEL: validate_checkpoint_id(checkpoint)})


def checkpoint_patch(
    checkpoint: str,
    *,
    previous: str | None = None,
    reason: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Strategic-merge patch body that rolls a Deployment to `checkpoint`.

    Only the pod template's checkpoint annotation and label change in the template; the
    bookkeeping (previous checkpoint, time, change-cause) goes on the Deployment's metadata so
    that it does not make otherwise identical templates differ.
    """
    validate_checkpoint_id(checkpoint)
    if previous is not None:
        validate_checkpoint_id(previous)
    now = now or datetime.now(timezone.utc)
    cause = f"alphamath promote: checkpoint {checkpoint}"
    if previous:
        cause += f" (was {previous})"
    if reason:
        cause += f": {reason}"
    meta_annotations = {
        PROMOTED_AT_ANNOTATION: now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        CHANGE_CAUSE_ANNOTATION: cause,
    }
    if previous:
        meta_annotations[PREVIOUS_ANNOTATION] = previous
    return {
        "metadata": {"annotations": meta_annotations},
        "spec": {
            "template": {
                "metadata": {
                    "annotations": {CHECKPOINT_ANNOTATION: checkpoint},
                    "labels": {CHECKPOINT_LABEL: checkpoint},
                }
            }
        },
    }


def current_checkpoint(deployment: Mapping[str, Any]) -> str | None:
    """The checkpoint a Deployment's pod template names (None if it has none)."""
    template_meta = ((deployment.get("spec") or {}).get("template") or {}).get("metadata") or {}
    return (template_meta.get("annotations") or {}).get(CHECKPOINT_ANNOTATION)


def check_target(deployment: Mapping[str, Any]) -> None:
    """Refuse to patch a Deployment that does not serve checkpoints (a misconfigured name)."""
    meta = deployment.get("metadata") or {}
    name = meta.get("name", "?")
    if not matches_selector(meta.get("labels"), target_selector()):
        raise RolloutError(
            f"deployment {name} does not carry the labels {target_selector()}: it does not "
            "serve checkpoints, refusing to roll it"
        )
    if current_checkpoint(deployment) is None:
        raise RolloutError(
            f"deployment {name} has no pod-template annotation {CHECKPOINT_ANNOTATION}: its pods "
            "would not pick up the checkpoint"
        )


@dataclass(frozen=True)
class RolloutState:
    """Where a Deployment's rollout stands (the logic of `kubectl rollout status`)."""

    done: bool
    failed: bool
    message: str


def rollout_state(deployment: Mapping[str, Any], min_generation: int = 0) -> RolloutState:
    """Done when the controller has seen generation >= `min_generation` and every replica is
    updated and available; failed when the Deployment's progress deadline was exceeded."""
    meta, spec, status = (deployment.get(k) or {} for k in ("metadata", "spec", "status"))
    name = meta.get("name", "?")
    generation = max(int(meta.get("generation") or 0), min_generation)
    observed = int(status.get("observedGeneration") or 0)
    if observed < generation:
        return RolloutState(False, False, f"{name}: waiting for the controller to observe generation {generation}")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return RolloutState(False, True, f"{name}: progress deadline exceeded: {cond.get('message', '')}".rstrip(": "))
    want = 1 if spec.get("replicas") is None else int(spec["replicas"])
    updated = int(status.get("updatedReplicas") or 0)
    total = int(status.get("replicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    if updated < want:
        return RolloutState(False, False, f"{name}: {updated} of {want} replicas updated")
    if total > updated:
        return RolloutState(False, False, f"{name}: {total - updated} old replicas pending termination")
    if available < updated:
        return RolloutState(False, False, f"{name}: {available} of {updated} updated replicas available")
    return RolloutState(True, False, f"{name}: rolled out ({updated} replicas)")


# ---- configuration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RolloutConfig:
    namespace: str
    deployments: tuple[str, ...]
    timeout_s: float = DEFAULT_TIMEOUT_S
    poll_s: float = DEFAULT_POLL_S
    rollback_on_failure: bool = True

    def __post_init__(self):
        if not _DNS_LABEL.match(self.namespace or ""):
            raise ValueError(f"namespace {self.namespace!r} is not a valid Kubernetes namespace name")
        if not self.deployments:
            raise ValueError("no deployments to roll")
        for name in self.deployments:
            if not re.match(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$", name):
                raise ValueError(f"deployment name {name!r} is not a valid Kubernetes name")
        if len(set(self.deployments)) != len(self.deployments):
            raise ValueError(f"deployments listed twice: {','.join(self.deployments)}")
        if self.timeout_s <= 0 or self.poll_s <= 0:
            raise ValueError("timeout_s and poll_s must be positive")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "RolloutConfig | None":
        """ALPHAMATH_ROLLOUT_DEPLOYMENTS (comma list; unset = not in Kubernetes, nothing to roll),
        ALPHAMATH_ROLLOUT_NAMESPACE (default: the pod's own namespace),
        ALPHAMATH_ROLLOUT_TIMEOUT_S, ALPHAMATH_ROLLOUT_POLL_S, ALPHAMATH_ROLLOUT_ROLLBACK (0/1)."""
        names = tuple(n.strip() for n in env.get("ALPHAMATH_ROLLOUT_DEPLOYMENTS", "").split(",") if n.strip())
        if not names:
            return None
        namespace = env.get("ALPHAMATH_ROLLOUT_NAMESPACE", "").strip()
        if not namespace:
            try:
                with open(SERVICE_ACCOUNT_NAMESPACE_FILE) as f:
                    namespace = f.read().strip()
            except OSError:
                raise ValueError(
                    "ALPHAMATH_ROLLOUT_NAMESPACE is unset and this is not a pod "
                    f"({SERVICE_ACCOUNT_NAMESPACE_FILE} unreadable)"
                ) from None

        def number(key: str, default: float) -> float:
            raw = env.get(key, "").strip()
            try:
                return float(raw) if raw else default
            except ValueError:
                raise ValueError(f"{key}={raw!r} is not a number") from None

        return cls(
            namespace=namespace,
            deployments=names,
            timeout_s=number("ALPHAMATH_ROLLOUT_TIMEOUT_S", DEFAULT_TIMEOUT_S),
            poll_s=number("ALPHAMATH_ROLLOUT_POLL_S", DEFAULT_POLL_S),
            rollback_on_failure=env.get("ALPHAMATH_ROLLOUT_ROLLBACK", "1").strip() not in ("0", "false", "no"),
        )


# ---- the thin part that talks to the API server ----------------------------------------------
@dataclass(frozen=True)
class RolloutResult:
    deployment: str
    checkpoint: str
    previous: str | None
    patched: bool  # False: it already served the checkpoint (a retried job)
    generation: int


def _as_dict(obj: Any, api: Any) -> dict[str, Any]:
    """API objects as the API server's JSON (camelCase), whatever the client returned."""
    if isinstance(obj, dict):
        return obj
    return api.api_client.sanitize_for_serialization(obj)


def _patch(api: Any, name: str, namespace: str, body: dict) -> dict[str, Any]:
    return _as_dict(
        api.patch_namespaced_deployment(
            name=name, namespace=namespace, body=body,
            field_manager=FIELD_MANAGER, _content_type=PATCH_CONTENT_TYPE,
        ),
        api,
    )


def _wait(api: Any, cfg: RolloutConfig, results: Sequence[RolloutResult],
          clock: Callable[[], float], sleep: Callable[[float], None]) -> None:
    deadline = clock() + cfg.timeout_s
    pending = {r.deployment: r.generation for r in results}
    last: dict[str, str] = {}
    while pending:
        for name, generation in list(pending.items()):
            dep = _as_dict(api.read_namespaced_deployment(name=name, namespace=cfg.namespace), api)
            state = rollout_state(dep, min_generation=generation)
            if state.message != last.get(name):
                log.info("rollout %s", state.message)
                last[name] = state.message
            if state.failed:
                raise RolloutError(state.message)
            if state.done:
                del pending[name]
        if not pending:
            return
        if clock() >= deadline:
            raise RolloutTimeout(
                f"rollout not finished after {cfg.timeout_s:.0f}s: " + "; ".join(last[n] for n in pending)
            )
        sleep(cfg.poll_s)


def roll_out(
    api: Any,
    checkpoint: str,
    cfg: RolloutConfig,
    *,
    reason: str | None = None,
    wait: bool = True,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[RolloutResult]:
    """Patch every configured Deployment to `checkpoint`, then wait until all have rolled out.

    `api` is a `kubernetes.client.AppsV1Api` (or anything with its read/patch methods). Every
    target is read and checked before any is patched, so a misconfigured name changes nothing.
    If a rollout fails or times out, the Deployments already patched are patched back to the
    checkpoint they served before (when `cfg.rollback_on_failure`), and RolloutError is raised:
    the caller must not announce the promotion.
    """
    validate_checkpoint_id(checkpoint)
    current: dict[str, dict] = {}
    for name in cfg.deployments:
        try:
            dep = _as_dict(api.read_namespaced_deployment(name=name, namespace=cfg.namespace), api)
        except Exception as exc:  # missing, forbidden (RBAC), API server down: nothing patched yet
            raise RolloutError(f"cannot read deployment {cfg.namespace}/{name}: {exc}") from exc
        check_target(dep)
        current[name] = dep

    results: list[RolloutResult] = []
    try:
        for name in cfg.deployments:
            previous = current_checkpoint(current[name])
            if previous == checkpoint:
                gen = int((current[name].get("metadata") or {}).get("generation") or 0)
                log.info("rollout %s already serves %s", name, checkpoint)
                results.append(RolloutResult(name, checkpoint, previous, False, gen))
                continue
            body = checkpoint_patch(checkpoint, previous=previous, reason=reason)
            patched = _patch(api, name, cfg.namespace, body)
            gen = int((patched.get("metadata") or {}).get("generation") or 0)
            log.info("rollout %s: %s -> %s (generation %d)", name, previous, checkpoint, gen)
            results.append(RolloutResult(name, checkpoint, previous, True, gen))
        if wait:
            _wait(api, cfg, results, clock, sleep)
    except Exception as exc:
        if cfg.rollback_on_failure:
            _roll_back(api, cfg, results, checkpoint)
        if isinstance(exc, RolloutError):
            raise
        raise RolloutError(f"rolling out {checkpoint} failed: {exc}") from exc
    return results


def _roll_back(api: Any, cfg: RolloutConfig, results: Sequence[RolloutResult], failed: str) -> None:
    """Best effort: put every Deployment we changed back on the checkpoint it served."""
    for r in results:
        if not r.patched or not r.previous:
            continue
        try:
            _patch(api, r.deployment, cfg.namespace,
                   checkpoint_patch(r.previous, previous=failed, reason=f"rollback: {failed} did not roll out"))
            log.warning("rollout %s rolled back to %s", r.deployment, r.previous)
        except Exception:  # keep rolling the others back; the original error is what matters
            log.exception("rollout %s: rollback to %s failed", r.deployment, r.previous)


def apps_api() -> Any:
    """AppsV1Api from the pod's ServiceAccount, else from the local kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.AppsV1Api()


def roll_out_from_env(checkpoint: str, *, reason: str | None = None,
                      env: Mapping[str, str] = os.environ, api: Any = None) -> list[RolloutResult] | None:
    """The promotion job's entry point: rolls out when ALPHAMATH_ROLLOUT_DEPLOYMENTS is set
    (in Kubernetes), returns None otherwise (local stack: services reload from the event)."""
    cfg = RolloutConfig.from_env(env)
    if cfg is None:
        return None
    return roll_out(api if api is not None else apps_api(), checkpoint, cfg, reason=reason)


def main(argv: Sequence[str] | None = None) -> int:
    """Operator CLI: roll (or roll back) by hand, e.g. from a workstation with a kubeconfig."""
    ap = argparse.ArgumentParser(prog="python -m trainer_svc.rollout", description=main.__doc__)
    ap.add_argument("checkpoint", help="checkpoint id: a directory name under the checkpoint root")
    ap.add_argument("--namespace", default=os.environ.get("ALPHAMATH_ROLLOUT_NAMESPACE", "alphamath"))
    ap.add_argument("--deployments", default=os.environ.get("ALPHAMATH_ROLLOUT_DEPLOYMENTS", "alphamath-tgi,alphamath-value"),
                    help="comma list of Deployments to roll")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    ap.add_argument("--no-wait", action="store_true", help="patch and return")
    ap.add_argument("--dry-run", action="store_true", help="print the patch bodies, touch nothing")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        cfg = RolloutConfig(a.namespace, tuple(n for n in a.deployments.split(",") if n), timeout_s=a.timeout)
        validate_checkpoint_id(a.checkpoint)
        if a.dry_run:
            for name in cfg.deployments:
                print(json.dumps({"deployment": name, "namespace": cfg.namespace,
                                  "contentType": PATCH_CONTENT_TYPE, "body": checkpoint_patch(a.checkpoint)}))
            return 0
        for r in roll_out(apps_api(), a.checkpoint, cfg, wait=not a.no_wait):
            print(f"{r.deployment}: {r.previous} -> {r.checkpoint}" + ("" if r.patched else " (unchanged)"))
        return 0
    except (ValueError, RolloutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
