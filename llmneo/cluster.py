"""Multi-node NEO distillation on Kubeflow Trainer: one TrainJob runs the same torchrun entry point.

    llmneo distill --preset P --dataset D --teacher T --student S --out O \\
        distill.nnodes=2 distill.nproc_per_node=6 cluster.staging_uri=s3://bucket/llmneo-staging
    python -m llmneo.cluster node --staging s3://bucket/llmneo-staging/llmneo-1a2b3c4d   # on each node

``llmneo.steps.distill_student`` calls :func:`run_distill_multinode` when ``distill.nnodes > 1``. The
launcher (the KFP distill pod, or a laptop with a kubeconfig):

1. stages the inputs (dataset, teacher, student folders and the resolved config) under
   ``cluster.staging_uri/<job>/inputs/`` in S3 — the training pods cannot see the KFP pod's files;
2. creates a ``TrainJob`` (trainer.kubeflow.org/v1alpha1) on the ``cluster.runtime``
   ClusterTrainingRuntime with ``numNodes = distill.nnodes`` and ``numProcPerNode =
   distill.nproc_per_node``, forwarding the KFP task's resources, tolerations, node selector,
   affinity, env and volumes (KFP's TaskConfig passthrough, the ``task_config`` argument),
   adding ``/dev/shm`` and the S3/hub secrets;
3. streams the logs of node 0, polls the TrainJob until ``Complete`` or ``Failed`` (or the deadline);
4. downloads the adapter written by node 0 (``<job>/adapter/``, sha256-verified) into the output
   folder, then deletes the TrainJob and the staged files (also on failure or SIGTERM).

Each node runs ``python -m llmneo.cluster node``: download the inputs, then ``torchrun --nnodes N
--nproc-per-node P --node-rank R --master-addr A -m llmneo.trainer --workdir DIR`` with the
rendezvous that Kubeflow Trainer provides (``PET_NODE_RANK``, ``PET_MASTER_ADDR``,
``PET_MASTER_PORT``); node 0 uploads the output and a completion marker last.

The Kubernetes client is imported lazily (it comes with kfp on a cluster); tests pass a fake.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

from llmneo import cards
from llmneo.cards import DistillCard
from llmneo.config import Config
from llmneo.errors import UserError, first_line
from llmneo.launch import (
    Rendezvous,
    TrainerInputs,
    launch_env,
    read_workdir,
    run_forwarding_signals,
    torchrun_command,
    write_workdir,
)
from llmneo.storage import download_prefix, open_object, open_store, upload_dir

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
NODE = "node"  # replicated job and container name of Kubeflow Trainer's torch runtimes
PATCH_MANAGER = "llmneo.io/launcher"
INPUTS = ("dataset", "teacher", "student")
DONE_MARKER = "adapter.done.json"

# Kubernetes secrets (created with `kubectl create secret`, docs/pipeline.md; never part of k8s/) →
# environment variables; used by the pipeline (kfp-kubernetes use_secret_as_env) and by the TrainJob's
# nodes (secretKeyRef).
S3_SECRET, HUB_SECRET = "llmneo-s3", "llmneo-hub"
SECRET_ENV = {
    S3_SECRET: ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"],
    HUB_SECRET: ["HF_TOKEN"],
}
IMAGE_GID = 1000  # the image's user and group (images/Dockerfile)
IMAGE_HOME, IMAGE_CACHE = "/home/llmneo", "/cache"  # images/Dockerfile: HOME; HF_HOME and LLMNEO_CACHE below /cache
NO_ISTIO = {"labels": {"sidecar.istio.io/inject": "false"}, "annotations": {"sidecar.istio.io/inject": "false"}}
# Trainer v2.2.0 is the first release whose TrainJob has runtimePatches and activeDeadlineSeconds
# (kubeflow/trainer 38d8243cf "Replace PodTemplateOverrides with RuntimePatches API"; v2.1.0's CRD has
# podTemplateOverrides); the API server prunes unknown fields of a structural CRD silently.
MIN_TRAINER = "v2.2"
REQUIRED_FIELDS = ("spec.runtimePatches", "spec.activeDeadlineSeconds")
# The launcher pod's identity (downward API; pipelines/llm_neo.py sets them on the launcher task):
# the TrainJob is owned by that pod, and named after the run's Argo workflow and the configuration so
# that a retried launcher finds its job again instead of starting a second one.
# The run's Argo workflow (one per KFP run, kept by every retry of it): an env var from the pod's label,
# not a task input, so that it stays out of KFP's cache key (backend/src/v2/cacheutils/cache.go
# GenerateCacheKey hashes every input parameter value, not the platform spec's field-path env).
WORKFLOW_ENV = "LLMNEO_WORKFLOW"
WORKFLOW_FIELD = "metadata.labels['workflows.argoproj.io/workflow']"
POD_IDENTITY_ENV = {"POD_NAME": "metadata.name", "POD_UID": "metadata.uid", "POD_NAMESPACE": "metadata.namespace",
                    WORKFLOW_ENV: WORKFLOW_FIELD}
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


# --------------------------------------------------------------------------------------------
# The TrainJob object
# --------------------------------------------------------------------------------------------


def secret_env() -> list[dict]:
    """Env entries reading the S3 and hub secrets (optional: a run without them still starts)."""
    return [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}
            for secret, keys in SECRET_ENV.items() for key in keys]


def restricted_container_security() -> dict:
    """Container securityContext of the restricted Pod Security Standard."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"}}


def task_settings(raw: dict | None = None) -> dict:
    """The KFP TaskConfig fields (snake_case keys, Kubernetes JSON values; the distill component passes
    ``dataclasses.asdict(task_config)``) with empty ones dropped."""
    return {k: v for k, v in (raw or {}).items() if v}


def shared_volume_at(task: dict | None, path: str) -> bool:
    """Whether the forwarded task settings mount a PersistentVolumeClaim at ``path`` or above it on every
    TrainJob node (:func:`build_trainjob` adds the task's volumes): a folder all nodes and every retry
    see, e.g. the cache PVC at /cache for the checkpoints."""
    task = task or {}
    claims = {v.get("name") for v in task.get("volumes") or [] if v.get("persistentVolumeClaim")}
    target = Path(path)
    return any(m.get("name") in claims and (target == Path(m.get("mountPath", "/-")) or
                                            Path(m.get("mountPath", "/-")) in target.parents)
               for m in task.get("volume_mounts") or [])


def build_trainjob(cfg: Config, name: str, namespace: str, image: str, staging: str,
                   task: dict | None = None, owner: dict | None = None) -> dict:
    """The TrainJob that runs ``python -m llmneo.cluster node`` on ``distill.nnodes`` nodes.

    ``task`` holds what the KFP task forwards (see :func:`task_settings`): ``resources`` become
    ``resourcesPerNode`` (default: ``distill.nproc_per_node`` × ``cluster.gpu_resource``);
    tolerations, node selector, affinity and volumes go into a runtime patch of the ``node`` pods.
    ``owner`` (:func:`launcher_owner`): the launcher pod owns the job, so the garbage collector
    removes it with the pod. The node pods opt out of Istio sidecar injection (profile namespaces
    inject one, and a sidecar that never exits keeps a finished node "running") and run with
    fsGroup 1000, so a cache volume created by root is writable by the image's uid 1000. Containers
    meet the restricted Pod Security Standard and have a read-only root filesystem: /tmp (the work
    folder), $HOME and /cache (unless forwarded) are emptyDir volumes.
    """
    task = task or {}
    d, c = cfg.distill, cfg.cluster
    resources = task.get("resources") or {"limits": {c.gpu_resource: d.nproc_per_node}}
    resources = {k: v for k, v in resources.items() if v}  # KFP sends empty requests/limits maps
    forwarded = [e for e in task.get("env", []) if e.get("name")]
    names = {e["name"] for e in forwarded}
    env = forwarded + [e for e in secret_env() if e["name"] not in names]
    # the root filesystem is read-only: every path a node writes is a volume (the work folder and
    # temp files under /tmp, $HOME's tool caches, /cache unless the task forwards its cache volume)
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}, {"name": "work", "emptyDir": {}},
               {"name": "home", "emptyDir": {}}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "work", "mountPath": "/tmp"},
              {"name": "home", "mountPath": IMAGE_HOME}]
    taken = {v["name"] for v in volumes}
    volumes += [v for v in task.get("volumes", []) if v.get("name") not in taken]
    mounts += [m for m in task.get("volume_mounts", []) if m.get("name") not in taken]
    if not any(m.get("mountPath") == IMAGE_CACHE for m in mounts):
        volumes.append({"name": "node-cache", "emptyDir": {}})
        mounts.append({"name": "node-cache", "mountPath": IMAGE_CACHE})
    container_security = {**restricted_container_security(), "readOnlyRootFilesystem": True}
    pod = {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"},
                            "fsGroup": IMAGE_GID, "fsGroupChangePolicy": "OnRootMismatch"},
        "volumes": volumes,
        "containers": [{"name": NODE, "volumeMounts": mounts, "securityContext": container_security}],
    }
    if task.get("node_selector"):
        pod["nodeSelector"] = dict(task["node_selector"])
    if task.get("tolerations"):
        pod["tolerations"] = list(task["tolerations"])
    if task.get("affinity"):
        pod["affinity"] = task["affinity"]
    metadata = {"name": name, "namespace": namespace,
                "labels": {"app.kubernetes.io/name": "llmneo", "app.kubernetes.io/component": "distill",
                           "llmneo.io/config-hash": cfg.hash()}}
    if owner:
        metadata["ownerReferences"] = [owner]
    return typed_trainjob({
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime", "name": c.runtime},
            "activeDeadlineSeconds": int(c.timeout_hours * 3600),
            "trainer": {
                "image": image,
                "command": ["python", "-m", "llmneo.cluster", "node", "--staging", staging],
                "numNodes": d.nnodes,
                "numProcPerNode": d.nproc_per_node,
                "resourcesPerNode": resources,
                "env": env,
            },
            "runtimePatches": [{
                "manager": PATCH_MANAGER,
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
                    {"name": NODE, "template": {"spec": {"template": {"metadata": NO_ISTIO, "spec": pod}}}}]}}},
            }],
        },
    })


def typed_trainjob(body: dict) -> dict:
    """``body`` through the typed TrainJob model of ``kubeflow-trainer-api`` (generated from Kubeflow
    Trainer's Go types, runtimePatches and the Kubernetes core types included): the model's JSON, or a
    UserError naming every field the API does not have. The generated ``from_dict`` keeps only the
    fields it knows, so a field it would drop — a typo, or one forwarded from the KFP task that this
    Trainer version lacks — fails here, not silently on the cluster (the API server prunes unknown
    fields of a structural CRD)."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    try:
        typed = TrainerV1alpha1TrainJob.from_dict(body).to_dict()
    except ValueError as e:  # pydantic's ValidationError is a ValueError: a wrong type or a missing field
        raise UserError(f"TrainJob: not valid for Kubeflow Trainer's API: {first_line(e)}") from None
    lost = _dropped(body, typed)
    if lost:
        raise UserError(f"TrainJob: {', '.join(lost)}: not in Kubeflow Trainer's TrainJob API "
                        f"(kubeflow-trainer-api {_api_version()})")
    return typed


def _dropped(sent, kept, path: str = "") -> list[str]:
    """Dotted paths present in ``sent`` but not in ``kept``."""
    if isinstance(sent, dict) and isinstance(kept, dict):
        return [p for k, v in sent.items()
                for p in ([f"{path}{k}"] if k not in kept else _dropped(v, kept[k], f"{path}{k}."))]
    if isinstance(sent, list) and isinstance(kept, list):
        return [p for i, (a, b) in enumerate(zip(sent, kept, strict=False))
                for p in _dropped(a, b, f"{path.rstrip('.')}[{i}].")]
    return []


def _api_version() -> str:
    from importlib.metadata import version

    return version("kubeflow-trainer-api")


def launcher_owner(env: dict | None = None, namespace: str | None = None) -> dict | None:
    """ownerReference to the launcher pod (``$POD_NAME``/``$POD_UID``, downward API), or None off-cluster
    or when the TrainJob goes to another ``namespace`` than the pod's (``$POD_NAMESPACE``): owner
    references are namespace-local, and the garbage collector deletes a dependent whose namespaced
    owner is not in its own namespace (kubernetes pkg/controller/garbagecollector/garbagecollector.go
    attemptToDeleteItem → isDangling looks the owner up in the dependent's namespace). No
    ``blockOwnerDeletion``: that would need update rights on pods/finalizers."""
    env = os.environ if env is None else env
    if not (env.get("POD_NAME") and env.get("POD_UID")):
        return None
    if namespace and env.get("POD_NAMESPACE", namespace) != namespace:
        return None
    return {"apiVersion": "v1", "kind": "Pod", "name": env["POD_NAME"], "uid": env["POD_UID"]}


def trainjob_name(cfg: Config, env: dict | None = None) -> str:
    """Deterministic inside a KFP run — the run's Argo workflow (``$LLMNEO_WORKFLOW``) and the
    configuration — so a retried launcher finds the job its earlier attempt created; random elsewhere."""
    import hashlib

    env = os.environ if env is None else env
    workflow = env.get(WORKFLOW_ENV, "")
    if not workflow:
        return f"llmneo-{uuid.uuid4().hex[:8]}"
    return "llmneo-" + hashlib.sha256(f"{workflow}/{cfg.hash()}".encode()).hexdigest()[:12]


def missing_fields(sent: dict, kept: dict, paths=REQUIRED_FIELDS) -> list[str]:
    """The dotted ``paths`` set in ``sent`` but absent from ``kept`` (the object after the API server's
    structural pruning, e.g. the answer to a dry-run create)."""
    def get(obj, path):
        for key in path.split("."):
            if not isinstance(obj, dict) or key not in obj:
                return None
            obj = obj[key]
        return obj

    return [p for p in paths if get(sent, p) is not None and get(kept, p) is None]


def check_trainer(api, namespace: str, body: dict) -> None:
    """Refuse a Kubeflow Trainer older than :data:`MIN_TRAINER`: a server-side dry-run create returns
    the object as it would be stored; an older TrainJob CRD prunes the fields it does not know
    (runtimePatches: no tolerations, node selector, /dev/shm, cache; activeDeadlineSeconds) without error."""
    with api_errors(f"check TrainJob {namespace}/{body['metadata']['name']} (dry run)"):
        kept = api.create_job(namespace, body, dry_run=True)
    lost = missing_fields(body, kept or {})
    if lost:
        raise UserError(f"Kubeflow Trainer on this cluster drops {', '.join(lost)} from a TrainJob: llmneo needs "
                        f"Kubeflow Trainer >= {MIN_TRAINER} (Kubeflow 1.11 ships v2.1: upgrade Trainer)")


def job_state(job: dict) -> tuple[str, str]:
    """("Complete" | "Failed" | "Running", message) from a TrainJob's status conditions."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in ("Complete", "Failed"):
            return cond["type"], cond.get("message") or cond.get("reason") or ""
    return "Running", ""


# --------------------------------------------------------------------------------------------
# Kubernetes API (lazy) and staging in S3
# --------------------------------------------------------------------------------------------


class KubeApi:
    """The calls the launcher needs, on the official client (in-cluster config or kubeconfig).
    Tests pass an object with the same methods instead."""

    def __init__(self):
        try:
            from kubernetes import client, config
        except ImportError:
            raise UserError("distill.nnodes > 1 needs the kubernetes package (pip install kubernetes)") from None
        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                config.load_kube_config()
            except (config.ConfigException, OSError):
                raise UserError("distill.nnodes > 1: no Kubernetes configuration (not in a pod and no "
                                "kubeconfig)") from None
        self.custom = client.CustomObjectsApi()
        self.core = client.CoreV1Api()

    def create_job(self, namespace: str, body: dict, dry_run: bool = False) -> dict:
        kwargs = {"dry_run": "All"} if dry_run else {}
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body, **kwargs)

    def get_job(self, namespace: str, name: str) -> dict:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def find_job(self, namespace: str, name: str) -> dict | None:
        """The TrainJob, or None when there is none by that name."""
        from kubernetes.client.exceptions import ApiException

        try:
            return self.get_job(namespace, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def set_owners(self, namespace: str, name: str, owners: list[dict]) -> None:
        """Replace the job's ownerReferences (a JSON merge patch replaces the whole list)."""
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                   {"metadata": {"ownerReferences": owners}})

    def delete_job(self, namespace: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                    propagation_policy="Foreground")

    def node0_pods(self, namespace: str, name: str) -> list[dict]:
        selector = (f"jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/replicatedjob-name={NODE},"
                    "batch.kubernetes.io/job-completion-index=0")
        pods = self.core.list_namespaced_pod(namespace, label_selector=selector).items
        return [{"name": p.metadata.name, "uid": p.metadata.uid, "phase": p.status.phase} for p in pods]

    def stream_log(self, namespace: str, pod: str):
        """Yield the pod's log lines as they come (follow), until its container ends."""
        resp = self.core.read_namespaced_pod_log(pod, namespace, container=NODE, follow=True,
                                                 _preload_content=False)
        try:
            buf = b""
            for chunk in resp.stream(4096):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                yield from (line.decode(errors="replace") for line in lines)
            if buf:
                yield buf.decode(errors="replace")
        finally:
            resp.release_conn()


@contextlib.contextmanager
def api_errors(what: str):
    """Kubernetes API failures as one-line UserErrors (RBAC, missing CRD, invalid object)."""
    try:
        from kubernetes.client.exceptions import ApiException
    except ImportError:  # pragma: no cover - kubernetes comes with kfp
        yield
        return
    try:
        yield
    except ApiException as e:
        hint = {403: "forbidden: apply k8s/ (Role llmneo-launcher) for this service account",
                404: "not found: is Kubeflow Trainer installed (TrainJob CRD, the runtime)?",
                409: "already exists", 422: "rejected as invalid"}.get(e.status, e.reason)
        detail = ""
        with contextlib.suppress(Exception):
            detail = ": " + json.loads(e.body).get("message", "")
        raise UserError(f"{what}: Kubernetes API {e.status} {hint}{detail}") from None


def current_namespace(cfg: Config) -> str:
    if cfg.cluster.namespace:
        return cfg.cluster.namespace
    path = Path(SA_NAMESPACE_FILE)
    if path.is_file():
        return path.read_text().strip()
    with contextlib.suppress(Exception):
        from kubernetes import config

        _, ctx = config.list_kube_config_contexts()
        if ctx and ctx.get("context", {}).get("namespace"):
            return ctx["context"]["namespace"]
    return "default"


# Staging goes through llmneo.storage: upload_dir (imported above) stores each file with its SHA-256,
# download_prefix checks every key and verifies every file.


def put_json(uri: str, payload: dict) -> None:
    store, key = open_object(uri)
    store.put_bytes(key, json.dumps(payload).encode())


def get_json(uri: str) -> dict | None:
    """The JSON object at ``uri``, or None when it does not exist."""
    store, key = open_object(uri)
    data = store.get_bytes(key)
    return None if data is None else json.loads(data)


def delete_prefix(uri: str) -> int:
    return open_store(uri).delete_prefix("")


# --------------------------------------------------------------------------------------------
# The launcher
# --------------------------------------------------------------------------------------------


class _Terminated(Exception):
    pass


def _raise_terminated(signum, frame):
    raise _Terminated()


def run_distill_multinode(cfg: Config, dataset_dir: str | Path, teacher_dir: str | Path,
                          student_dir: str | Path, out_dir: str | Path, task_config: dict | None = None, *,
                          api=None, job_name: str | None = None, log=print) -> dict:
    """Run NEO distillation as a TrainJob on ``distill.nnodes`` nodes; returns the adapter card
    (same contract as :func:`llmneo.steps.distill_student`, plus ``engine`` and ``job``). ``task_config``:
    what the KFP task forwards to the nodes (see :func:`task_settings`)."""
    c = cfg.cluster
    if not c.staging_uri.startswith("s3://"):
        raise UserError(f"cluster.staging_uri: must be an s3:// URI when distill.nnodes > 1 (the nodes read the "
                        f"inputs and write the adapter there), got {c.staging_uri!r}")
    image = c.image or os.environ.get("LLMNEO_IMAGE", "")
    if not image:
        raise UserError("cluster.image: empty and $LLMNEO_IMAGE is not set: which image do the nodes run?")
    t0 = time.time()
    name = job_name or trainjob_name(cfg)
    staging = f"{c.staging_uri.rstrip('/')}/{name}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cards.remove(out)  # a failed job must not leave a previous run's card (= "complete") behind

    api = api or KubeApi()
    namespace = current_namespace(cfg)
    owner = launcher_owner(namespace=namespace)
    if owner is None and os.environ.get("POD_NAME"):
        print(f"distill: TrainJob in namespace {namespace}, not the launcher's: no owner reference (it is deleted "
              f"by this launcher when it ends, not by the garbage collector)", flush=True)
    body = build_trainjob(cfg, name, namespace, image, staging, task_settings(task_config), owner=owner)
    previous = signal.getsignal(signal.SIGTERM)
    in_main = _is_main_thread()
    if in_main:  # KFP cancels a run by terminating the pod: still clean up the TrainJob
        signal.signal(signal.SIGTERM, _raise_terminated)
    created = False
    try:
        created = _attach(api, namespace, name, owner, log)  # a retry finds its earlier attempt's job
        if not created:
            check_trainer(api, namespace, body)
            with tempfile.TemporaryDirectory() as tmp:
                # the resolved configuration travels as a work folder (its inputs are rewritten on the node)
                write_workdir(tmp, cfg, TrainerInputs(*INPUTS))
                upload_dir(tmp, f"{staging}/inputs")
            for key, folder in zip(INPUTS, (dataset_dir, teacher_dir, student_dir), strict=True):
                n = upload_dir(folder, f"{staging}/inputs/{key}")
                log(f"staged {key}: {n} files → {staging}/inputs/{key}")
            with api_errors(f"create TrainJob {namespace}/{name}"):
                api.create_job(namespace, body)
            created = True
            log(f"created TrainJob {namespace}/{name}: {cfg.distill.nnodes} nodes × {cfg.distill.nproc_per_node} "
                f"processes on runtime {c.runtime}")
        state, message = _wait(api, cfg, namespace, name, log)
        if state != "Complete":
            raise UserError(f"distill: TrainJob {namespace}/{name} {state.lower()}: {message or 'see the log above'}")
        if get_json(f"{staging}/{DONE_MARKER}") is None:
            raise UserError(f"distill: TrainJob {name} completed but node 0 wrote no adapter under {staging}")
        download_prefix(f"{staging}/adapter", out)
    except _Terminated:
        raise UserError(f"distill: terminated; TrainJob {namespace}/{name} deleted") from None
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        if not c.keep_job:
            if created:
                with contextlib.suppress(Exception), api_errors(f"delete TrainJob {name}"):
                    api.delete_job(namespace, name)
                    log(f"deleted TrainJob {namespace}/{name}")
            with contextlib.suppress(Exception):
                delete_prefix(staging)

    card = DistillCard.read(out)
    card.wall_seconds = round(time.time() - t0, 2)
    card.extra.update({"engine": "kubeflow-trainer", "job": name, "nnodes": cfg.distill.nnodes})
    return card.write(out)


def _attach(api, namespace: str, name: str, owner: dict | None, log, gone_timeout: float = 300) -> bool:
    """Re-attach to a TrainJob of that name left by an earlier attempt of this task: a running or
    completed one is kept (the launcher becomes a second owner, so the garbage collector keeps it
    while either pod exists); a failed one is deleted, and the caller starts afresh. True: attached."""
    with api_errors(f"TrainJob {namespace}/{name}"):
        job = api.find_job(namespace, name)
    if job is None:
        return False
    state, _ = job_state(job)
    if state == "Failed":
        log(f"TrainJob {namespace}/{name} of an earlier attempt failed: deleting it and starting afresh")
        with api_errors(f"delete TrainJob {name}"):
            api.delete_job(namespace, name)
        deadline = time.time() + gone_timeout
        while True:
            with api_errors(f"TrainJob {namespace}/{name}"):
                if api.find_job(namespace, name) is None:
                    return False
            if time.time() > deadline:
                raise UserError(f"distill: TrainJob {namespace}/{name} of an earlier attempt is still being deleted")
            time.sleep(2)
    owners = list((job.get("metadata") or {}).get("ownerReferences") or [])
    if owner and all(o.get("uid") != owner["uid"] for o in owners):
        with api_errors(f"own TrainJob {namespace}/{name}"):
            api.set_owners(namespace, name, owners + [owner])
    log(f"re-attached to TrainJob {namespace}/{name} ({state.lower()}), started by an earlier attempt")
    return True


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _wait(api, cfg: Config, namespace: str, name: str, log) -> tuple[str, str]:
    """Poll until the TrainJob ends; stream node 0's log whenever a (new) node-0 pod runs."""
    deadline = time.time() + cfg.cluster.timeout_hours * 3600 + 600
    streamed: set[str] = set()
    last = None
    while True:
        with api_errors(f"TrainJob {namespace}/{name}"):
            state, message = job_state(api.get_job(namespace, name))
        if state != last:
            log(f"TrainJob {name}: {state}{(' - ' + message) if message else ''}")
            last = state
        with api_errors(f"pods of TrainJob {name}"):
            pods = [p for p in api.node0_pods(namespace, name)
                    if p["uid"] not in streamed and p["phase"] in ("Running", "Succeeded", "Failed")]
        for pod in pods:
            streamed.add(pod["uid"])
            log(f"--- log of {pod['name']} (node 0) ---")
            with contextlib.suppress(Exception):  # a log stream cut short must not fail the run
                for line in api.stream_log(namespace, pod["name"]):
                    log(line)
            log(f"--- end of {pod['name']} log ---")
        if state != "Running":
            return state, message
        if time.time() > deadline:
            return "Failed", f"no end after cluster.timeout_hours={cfg.cluster.timeout_hours}"
        if not pods:
            time.sleep(cfg.cluster.poll_seconds)


# --------------------------------------------------------------------------------------------
# What each training node runs
# --------------------------------------------------------------------------------------------


def run_node(staging: str, workdir: str | Path | None = None) -> int:
    """One training node: fetch the staged inputs, run torchrun, and (node 0) upload the output."""
    env = os.environ
    rendezvous = Rendezvous(node_rank=int(env.get("PET_NODE_RANK") or env.get("JOB_COMPLETION_INDEX") or 0),
                            master_addr=env.get("PET_MASTER_ADDR") or env.get("MASTER_ADDR") or "127.0.0.1",
                            master_port=int(env.get("PET_MASTER_PORT") or env.get("MASTER_PORT") or 29400))
    rank = rendezvous.node_rank
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="llmneo-node-"))
    inputs = work / "inputs"
    download_prefix(f"{staging}/inputs", inputs)
    cfg, _ = read_workdir(inputs)
    out = work / "out"
    if out.exists():
        shutil.rmtree(out)
    write_workdir(out, cfg, TrainerInputs.of(*(inputs / k for k in INPUTS)))
    cmd = torchrun_command(cfg, out, rendezvous)
    print(f"node {rank}/{cfg.distill.nnodes}: + " + " ".join(cmd), flush=True)
    returncode = run_forwarding_signals(cmd, launch_env(cfg))
    if returncode != 0:
        return returncode
    if rank == 0:
        n = upload_dir(out, f"{staging}/adapter")
        put_json(f"{staging}/{DONE_MARKER}", {"files": n, "time": time.time()})  # written last
        print(f"node 0: uploaded {n} files → {staging}/adapter", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="llmneo multi-node training node (run by the TrainJob)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("node", help="run one training node of a multi-node distillation")
    p.add_argument("--staging", required=True, help="s3://… prefix the launcher staged the inputs under")
    p.add_argument("--workdir", default=None, help="local work folder (default: a fresh temporary folder)")
    args = parser.parse_args(argv)
    try:
        return run_node(args.staging, args.workdir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
