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
   affinity, env and volumes (KFP's TaskConfig passthrough, handed over in ``$LLMNEO_TASK_CONFIG``),
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
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

from llmneo.config import Config, config_from_dict, dump_yaml
from llmneo.errors import UserError

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
NODE = "node"  # replicated job and container name of Kubeflow Trainer's torch runtimes
PATCH_MANAGER = "llmneo.io/launcher"
INPUTS = ("dataset", "teacher", "student")
DONE_MARKER = "adapter.done.json"

# Kubernetes secrets (templates in k8s/base/secrets.yaml) → environment variables; used by the
# pipeline (kfp-kubernetes use_secret_as_env) and by the TrainJob's nodes (secretKeyRef).
S3_SECRET, HUB_SECRET = "llmneo-s3", "llmneo-hub"
SECRET_ENV = {
    S3_SECRET: ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"],
    HUB_SECRET: ["HF_TOKEN"],
}
TASK_CONFIG_ENV = "LLMNEO_TASK_CONFIG"  # JSON of kfp's TaskConfig, set by the distill component
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
    """The KFP TaskConfig fields (snake_case keys, Kubernetes JSON values) with empty ones dropped;
    from ``$LLMNEO_TASK_CONFIG`` when ``raw`` is None."""
    if raw is None:
        text = os.environ.get(TASK_CONFIG_ENV, "")
        try:
            raw = json.loads(text) if text else {}
        except json.JSONDecodeError:
            raise UserError(f"${TASK_CONFIG_ENV}: not valid JSON") from None
    return {k: v for k, v in (raw or {}).items() if v}


def build_trainjob(cfg: Config, name: str, namespace: str, image: str, staging: str,
                   task: dict | None = None) -> dict:
    """The TrainJob that runs ``python -m llmneo.cluster node`` on ``distill.nnodes`` nodes.

    ``task`` holds what the KFP task forwards (see :func:`task_settings`): ``resources`` become
    ``resourcesPerNode`` (default: ``distill.nproc_per_node`` × ``cluster.gpu_resource``);
    tolerations, node selector, affinity and volumes go into a runtime patch of the ``node`` pods.
    """
    task = task or {}
    d, c = cfg.distill, cfg.cluster
    resources = task.get("resources") or {"limits": {c.gpu_resource: d.nproc_per_node}}
    resources = {k: v for k, v in resources.items() if v}  # KFP sends empty requests/limits maps
    forwarded = [e for e in task.get("env", []) if e.get("name")]
    names = {e["name"] for e in forwarded}
    env = forwarded + [e for e in secret_env() if e["name"] not in names]
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}, {"name": "work", "emptyDir": {}}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "work", "mountPath": "/tmp"}]
    taken = {v["name"] for v in volumes}
    volumes += [v for v in task.get("volumes", []) if v.get("name") not in taken]
    mounts += [m for m in task.get("volume_mounts", []) if m.get("name") not in taken]
    pod = {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "volumes": volumes,
        "containers": [{"name": NODE, "volumeMounts": mounts, "securityContext": restricted_container_security()}],
    }
    if task.get("node_selector"):
        pod["nodeSelector"] = dict(task["node_selector"])
    if task.get("tolerations"):
        pod["tolerations"] = list(task["tolerations"])
    if task.get("affinity"):
        pod["affinity"] = task["affinity"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/name": "llmneo", "app.kubernetes.io/component": "distill",
                                "llmneo.io/config-hash": cfg.hash()}},
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
                    {"name": NODE, "template": {"spec": {"template": {"spec": pod}}}}]}}},
            }],
        },
    }


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
    """The four calls the launcher needs, on the official client (in-cluster config or kubeconfig).
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

    def create_job(self, namespace: str, body: dict) -> dict:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    def get_job(self, namespace: str, name: str) -> dict:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

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


def upload_dir(local: str | Path, uri: str) -> int:
    """Upload every file under ``local`` to ``uri/<relative path>`` with a SHA-256 checksum (so
    :func:`llmneo.s3.download_prefix` verifies it). Returns the number of files."""
    from llmneo import s3

    bucket, prefix = s3.parse_uri(uri)
    client = s3.client()
    files = sorted(p for p in Path(local).rglob("*") if p.is_file())
    with s3.errors(uri):
        for path in files:
            key = f"{prefix}/{path.relative_to(local).as_posix()}".lstrip("/")
            client.upload_file(str(path), bucket, key, ExtraArgs={"ChecksumAlgorithm": "SHA256"})
    return len(files)


def put_json(uri: str, payload: dict) -> None:
    from llmneo import s3

    bucket, key = s3.parse_uri(uri)
    with s3.errors(uri):
        s3.client().put_object(Bucket=bucket, Key=key, Body=json.dumps(payload).encode(),
                               ChecksumAlgorithm="SHA256")


def get_json(uri: str) -> dict | None:
    """The JSON object at ``uri``, or None when it does not exist."""
    from botocore.exceptions import ClientError

    from llmneo import s3

    bucket, key = s3.parse_uri(uri)
    with s3.errors(uri):
        try:
            return json.loads(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise


def delete_prefix(uri: str) -> int:
    from llmneo import s3

    bucket, prefix = s3.parse_uri(uri)
    client = s3.client()
    n = 0
    with s3.errors(uri):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
                n += len(keys)
    return n


# --------------------------------------------------------------------------------------------
# The launcher
# --------------------------------------------------------------------------------------------


class _Terminated(Exception):
    pass


def _raise_terminated(signum, frame):
    raise _Terminated()


def run_distill_multinode(cfg: Config, dataset_dir: str | Path, teacher_dir: str | Path,
                          student_dir: str | Path, out_dir: str | Path, *, api=None,
                          job_name: str | None = None, log=print) -> dict:
    """Run NEO distillation as a TrainJob on ``distill.nnodes`` nodes; returns the adapter card
    (same contract as :func:`llmneo.steps.distill_student`, plus ``engine`` and ``job``)."""
    c = cfg.cluster
    if not c.staging_uri.startswith("s3://"):
        raise UserError(f"cluster.staging_uri: must be an s3:// URI when distill.nnodes > 1 (the nodes read the "
                        f"inputs and write the adapter there), got {c.staging_uri!r}")
    image = c.image or os.environ.get("LLMNEO_IMAGE", "")
    if not image:
        raise UserError("cluster.image: empty and $LLMNEO_IMAGE is not set: which image do the nodes run?")
    t0 = time.time()
    name = job_name or f"llmneo-{uuid.uuid4().hex[:8]}"
    staging = f"{c.staging_uri.rstrip('/')}/{name}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    api = api or KubeApi()
    namespace = current_namespace(cfg)
    body = build_trainjob(cfg, name, namespace, image, staging, task_settings())
    previous = signal.getsignal(signal.SIGTERM)
    in_main = _is_main_thread()
    if in_main:  # KFP cancels a run by terminating the pod: still clean up the TrainJob
        signal.signal(signal.SIGTERM, _raise_terminated)
    created = False
    try:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.yaml").write_text(dump_yaml(cfg))
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
        from llmneo.s3 import download_prefix

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

    from llmneo.models import read_card, write_card

    card = read_card(out)
    card.update({"wall_seconds": round(time.time() - t0, 2), "engine": "kubeflow-trainer", "job": name,
                 "nnodes": cfg.distill.nnodes})
    return write_card(out, card)


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


def node_torchrun_command(cfg: Config, workdir: Path, node_rank: int, master_addr: str, master_port: int) -> list[str]:
    """torchrun over ``distill.nnodes`` nodes (static rendezvous on node 0), same entry point as one node."""
    d = cfg.distill
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={d.nnodes}",
            f"--nproc-per-node={d.nproc_per_node}", f"--node-rank={node_rank}", f"--master-addr={master_addr}",
            f"--master-port={master_port}", "-m", "llmneo.trainer", "--workdir", str(workdir)]


def run_node(staging: str, workdir: str | Path | None = None) -> int:
    """One training node: fetch the staged inputs, run torchrun, and (node 0) upload the output."""
    from llmneo.s3 import download_prefix

    env = dict(os.environ)
    rank = int(env.get("PET_NODE_RANK") or env.get("JOB_COMPLETION_INDEX") or 0)
    addr = env.get("PET_MASTER_ADDR") or env.get("MASTER_ADDR") or "127.0.0.1"
    port = int(env.get("PET_MASTER_PORT") or env.get("MASTER_PORT") or 29400)
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="llmneo-node-"))
    inputs = work / "inputs"
    download_prefix(f"{staging}/inputs", inputs)
    cfg = config_from_dict(yaml.safe_load((inputs / "config.yaml").read_text()))
    out = work / "out"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(dump_yaml(cfg))
    (out / "inputs.json").write_text(json.dumps({k: str(inputs / k) for k in INPUTS}, indent=2))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.distill.nproc_per_node)))
    cmd = node_torchrun_command(cfg, out, rank, addr, port)
    print(f"node {rank}/{cfg.distill.nnodes}: + " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        return proc.returncode
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
