"""The Kubernetes manifests in k8s/, checked offline.

Every object is validated against its schema: KubeRay v1.7.0's CRDs (converted once to strict
JSON Schemas, k8s/schemas/) for RayCluster and RayJob, and Kubernetes 1.34's strict schemas
(shipped with `kubernetes-validate`) for the core kinds. Then the rules no schema can say:
nothing public, token authentication on, GPUs on the workers and none on the head, a RayJob
that cleans up after itself and has a name KubeRay accepts, the settings tlray reads spelled
as tlray reads them. Each check is also shown to fail on a copy broken on purpose.
"""

from __future__ import annotations

import copy
import gzip
import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = ROOT / "k8s"
KUBERAY = "v1.7.0"
KUBERNETES = "1.34.0"
CRD_SCHEMAS = {("ray.io/v1", "RayCluster"): "rayclusters.ray.io.v1.json.gz",
               ("ray.io/v1", "RayJob"): "rayjobs.ray.io.v1.json.gz"}
RAYJOB_NAME_MAX = 47  # KubeRay derives longer names from it; it refuses names of 48 or more


def load_all() -> list[tuple[str, dict]]:
    """(file name, object) for every object in k8s/*.yaml (the Kustomization aside)."""
    out = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            out += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def _crd_schema(name: str) -> dict:
    with gzip.open(K8S_DIR / "schemas" / name, "rt") as f:
        return json.load(f)


def schema_errors(obj: dict) -> list[str]:
    """What the object's schema says is wrong with it (empty: valid)."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in CRD_SCHEMAS:
        validator = jsonschema.Draft7Validator(_crd_schema(CRD_SCHEMAS[key]))
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in validator.iter_errors(obj)]
        # A CRD's schema leaves metadata open; check it as Kubernetes checks any object's.
        obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata")}
    else:
        errors = []
    try:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    except kubernetes_validate.ValidationError as e:
        errors.append(f"{'.'.join(map(str, e.path))}: {e.message}")
    return errors


# --------------------------------------------------------------------------- the rules


def tlray_reads() -> set[str]:
    """Environment variables tlray's code reads, from its source."""
    pattern = re.compile(r"""(?:environ(?:\.get|\.setdefault)?\(?\[?|getenv\()\s*"""
                         r"""["']([A-Z][A-Z0-9_]+)["']""")
    return {m for p in (ROOT / "tlray").rglob("*.py") for m in pattern.findall(p.read_text())}


def _pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(role, pod template) of a RayCluster, a RayJob's cluster or a Deployment."""
    spec = obj.get("spec", {})
    if obj["kind"] == "RayJob":
        spec = spec.get("rayClusterSpec", {})
    if obj["kind"] in ("RayCluster", "RayJob"):
        return ([("head", spec["headGroupSpec"]["template"])]
                + [(f"worker group {g['groupName']}", g["template"])
                   for g in spec.get("workerGroupSpecs", [])])
    if obj["kind"] == "Deployment":
        return [(obj["metadata"]["name"], spec["template"])]
    return []


def _env_names(objects: list[dict]) -> set[str]:
    names = set()
    for obj in objects:
        if obj["kind"] == "ConfigMap":
            names |= set(obj.get("data", {}))
        if obj["kind"] == "RayJob":
            names |= set(yaml.safe_load(obj["spec"].get("runtimeEnvYAML") or "{}")
                         .get("env_vars", {}))
        for _, template in _pod_templates(obj):
            for c in template["spec"]["containers"]:
                names |= {e["name"] for e in c.get("env", [])}
    return names


def rule_violations(objects: list[dict]) -> list[str]:
    """Everything schemas cannot check, as one line per problem (empty: all kept)."""
    problems = []
    by_kind: dict[str, list[dict]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    for svc in by_kind.get("Service", []):
        if svc["spec"].get("type", "ClusterIP") != "ClusterIP":
            problems.append(f"Service {svc['metadata']['name']} is {svc['spec']['type']}: "
                            f"only ClusterIP Services, nothing public")
    clusters = [(o, o["spec"] if o["kind"] == "RayCluster" else o["spec"]["rayClusterSpec"])
                for o in by_kind.get("RayCluster", []) + by_kind.get("RayJob", [])]
    for obj, spec in clusters:
        what = f"{obj['kind']} {obj['metadata']['name']}"
        if (spec.get("authOptions") or {}).get("mode") != "token":
            problems.append(f"{what}: token authentication is off (authOptions.mode)")
        head = spec["headGroupSpec"]
        if head.get("serviceType", "ClusterIP") != "ClusterIP":
            problems.append(f"{what}: head Service is {head['serviceType']}, not ClusterIP")
        if (head.get("headService") or {}).get("spec", {}).get("type", "ClusterIP") != \
                "ClusterIP":
            problems.append(f"{what}: headService is not ClusterIP")
        if str(head.get("rayStartParams", {}).get("num-gpus")) != "0":
            problems.append(f"{what}: the head must offer Ray no GPU (num-gpus: \"0\")")
        for c in head["template"]["spec"]["containers"]:
            if any("gpu" in k for part in ("limits", "requests")
                   for k in c.get("resources", {}).get(part, {})):
                problems.append(f"{what}: head container {c['name']} asks for a GPU")
        if not spec.get("workerGroupSpecs"):
            problems.append(f"{what}: no worker group")
        for group in spec.get("workerGroupSpecs", []):
            ray = group["template"]["spec"]["containers"][0]
            if int(ray.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) < 1:
                problems.append(f"{what}: worker group {group['groupName']} has no "
                                f"nvidia.com/gpu limit")
            if not 0 <= group.get("minReplicas", 0) <= group.get("maxReplicas", -1):
                problems.append(f"{what}: worker group {group['groupName']} needs "
                                f"0 <= minReplicas <= maxReplicas")
    for job in by_kind.get("RayJob", []):
        name, spec = job["metadata"]["name"], job["spec"]
        if len(name) > RAYJOB_NAME_MAX:
            problems.append(f"RayJob {name}: {len(name)} characters, at most {RAYJOB_NAME_MAX}")
        if "ttlSecondsAfterFinished" in spec and not spec.get("shutdownAfterJobFinishes"):
            problems.append(f"RayJob {name}: ttlSecondsAfterFinished without "
                            f"shutdownAfterJobFinishes does nothing (the cluster stays)")
        if not spec.get("shutdownAfterJobFinishes"):
            problems.append(f"RayJob {name}: its cluster outlives the job "
                            f"(shutdownAfterJobFinishes)")
    reads, named = tlray_reads(), _env_names(objects)
    for env in sorted(n for n in named if n.startswith(("TLRAY_", "MLFLOW_"))
                      and n != "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"):
        if env not in reads:
            problems.append(f"{env} is set, but tlray reads no such variable (it reads "
                            f"{', '.join(sorted(r for r in reads if r.startswith('TLRAY_')))}"
                            f" and MLFLOW_TRACKING_URI)")
    for needed in ("TLRAY_STORAGE", "MLFLOW_TRACKING_URI"):
        if needed not in named:
            problems.append(f"{needed} is set nowhere: multi-node runs need it")
    for obj in objects:
        for role, template in _pod_templates(obj):
            pod = template["spec"]
            secure = pod.get("securityContext", {})
            if not secure.get("runAsNonRoot"):
                problems.append(f"{obj['kind']} {obj['metadata']['name']} {role}: "
                                f"runAsNonRoot is not set")
            for c in pod["containers"]:
                sc = c.get("securityContext", {})
                if sc.get("allowPrivilegeEscalation") is not False or \
                        "ALL" not in sc.get("capabilities", {}).get("drop", []):
                    problems.append(f"{obj['kind']} {obj['metadata']['name']} {role}: "
                                    f"container {c['name']} may escalate privileges")
    return problems


# --------------------------------------------------------------------------- tests


def test_every_manifest_is_valid_against_its_schema():
    objects = load_all()
    kinds = sorted({obj["kind"] for _, obj in objects})
    assert kinds == ["ConfigMap", "Deployment", "Namespace", "NetworkPolicy",
                     "PersistentVolumeClaim", "RayCluster", "RayJob", "Service",
                     "ServiceAccount"]
    for name, obj in objects:
        assert schema_errors(obj) == [], (name, obj["kind"])
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "tlray", (name, obj["kind"])


@pytest.mark.parametrize("kind, break_it, expected", [
    ("RayCluster", lambda o: o["spec"]["headGroupSpec"].update(serviceTyp="ClusterIP"),
     "serviceTyp"),
    ("RayCluster", lambda o: o["spec"]["workerGroupSpecs"][0].update(maxReplicas="four"),
     "'four' is not of type 'integer'"),
    ("RayCluster", lambda o: o["spec"]["authOptions"].update(mode="on"), "'on' is not one of"),
    ("RayCluster", lambda o: o["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
     .update(imagePullPolicyy="Always"), "imagePullPolicyy"),
    ("RayJob", lambda o: o["spec"].update(shutdownAfterJobFinished=True),
     "shutdownAfterJobFinished"),
    ("RayJob", lambda o: o["spec"].update(ttlSecondsAfterFinished="10m"),
     "'10m' is not of type 'integer'"),
    ("RayJob", lambda o: o["metadata"].update(labelz={}), "labelz"),
    ("Deployment", lambda o: o["spec"].update(replica=1), "replica"),
    ("Deployment", lambda o: o["spec"]["template"]["spec"]["containers"][0]["ports"][0]
     .update(containerPort="5000"), "'5000' is not of type 'integer'"),
    ("Service", lambda o: o["spec"]["ports"][0].update(prot=5000), "prot"),
])
def test_a_copy_with_an_unknown_field_or_a_wrong_type_fails(kind, break_it, expected):
    obj = copy.deepcopy(next(o for _, o in load_all() if o["kind"] == kind))
    break_it(obj)
    errors = schema_errors(obj)
    assert any(expected in e for e in errors), errors


def test_the_rules_hold():
    assert rule_violations([obj for _, obj in load_all()]) == []


def _edit(kind: str, change):
    objects = copy.deepcopy([obj for _, obj in load_all()])
    change(next(o for o in objects if o["kind"] == kind))
    return rule_violations(objects)


def _head(o):
    return o["spec"]["headGroupSpec"]


def _gpu_limits(o):
    return o["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resources"]["limits"]


@pytest.mark.parametrize("kind, change, expected", [
    ("Service", lambda o: o["spec"].update(type="LoadBalancer"), "only ClusterIP"),
    ("Service", lambda o: o["spec"].update(type="NodePort"), "only ClusterIP"),
    ("RayCluster", lambda o: _head(o).update(serviceType="NodePort"), "not ClusterIP"),
    ("RayCluster", lambda o: o["spec"].pop("authOptions"), "token authentication is off"),
    ("RayJob", lambda o: o["spec"]["rayClusterSpec"]["authOptions"].update(mode="disabled"),
     "token authentication is off"),
    ("RayCluster", lambda o: _gpu_limits(o).pop("nvidia.com/gpu"), "no nvidia.com/gpu limit"),
    ("RayCluster", lambda o: _head(o)["template"]["spec"]["containers"][0]["resources"][
        "limits"].update({"nvidia.com/gpu": "1"}), "asks for a GPU"),
    ("RayCluster", lambda o: _head(o)["rayStartParams"].pop("num-gpus"), "no GPU"),
    ("RayJob", lambda o: o["spec"].update(shutdownAfterJobFinishes=False),
     "ttlSecondsAfterFinished without shutdownAfterJobFinishes"),
    ("RayJob", lambda o: o["metadata"].update(name="tlray-" + "x" * 42), "at most 47"),
    ("ConfigMap", lambda o: o["data"].update(TLRAY_STORGE=o["data"].pop("TLRAY_STORAGE")),
     "TLRAY_STORGE is set, but tlray reads no such variable"),
    ("RayJob", lambda o: o["spec"].update(runtimeEnvYAML="env_vars:\n  MLFLOW_TRACKING_URL: x\n"),
     "MLFLOW_TRACKING_URL is set, but tlray reads no such variable"),
    ("Deployment", lambda o: o["spec"]["template"]["spec"]["containers"][0].pop(
        "securityContext"), "may escalate privileges"),
])
def test_each_rule_fails_on_a_copy_that_breaks_it(kind, change, expected):
    problems = _edit(kind, change)
    assert any(expected in p for p in problems), problems


def test_the_pieces_agree_with_each_other_and_with_tlray():
    objects = {(o["kind"], o["metadata"]["name"]): o for _, o in load_all()}
    cluster, job = objects[("RayCluster", "tlray")], objects[("RayJob", "tlray-tune-mnist")]
    # The one-shot job runs on exactly the long-lived cluster's spec.
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    assert job["spec"]["entrypoint"].startswith("python jobs/tune_mnist.py ")
    runtime = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    settings = objects[("ConfigMap", "tlray-settings")]["data"]
    assert {k: runtime["env_vars"][k] for k in runtime["env_vars"]} == {
        k: settings[k] for k in runtime["env_vars"]}
    # MLflow is where the settings say it is.
    service = objects[("Service", "tlray-mlflow")]
    assert settings["MLFLOW_TRACKING_URI"] == (
        f"http://{service['metadata']['name']}.{service['metadata']['namespace']}"
        f".svc.cluster.local:{service['spec']['ports'][0]['port']}")
    # One image everywhere, built by k8s/Dockerfile on the Ray that tlray pins.
    images = {c["image"] for o in objects.values() for _, t in _pod_templates(o)
              for c in t["spec"]["containers"]}
    assert len(images) == 1, images
    minor = re.search(r'"ray\[[^"]*\]==(\d+\.\d+)', (ROOT / "pyproject.toml").read_text()).group(1)
    assert cluster["spec"]["rayVersion"].startswith(minor + ".")
    assert f"FROM rayproject/ray:{cluster['spec']['rayVersion']}-" in (
        K8S_DIR / "Dockerfile").read_text()
    # The Kustomization applies every long-lived manifest; the pinned KubeRay is documented.
    listed = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S_DIR.glob("*.yaml")
                                    if p.name not in ("kustomization.yaml",
                                                      "rayjob-tune-mnist.yaml"))
    for doc in ("docs/kubernetes.md", "k8s/schemas/README.md"):
        assert f"KubeRay {KUBERAY}" in (ROOT / doc).read_text().replace("**", ""), doc
    assert all(KUBERAY in _crd_schema(f)["$comment"] for f in CRD_SCHEMAS.values())
