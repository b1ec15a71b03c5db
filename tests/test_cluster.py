"""Multi-node launcher (llmneo/cluster.py): the TrainJob it builds validates against the Kubeflow
Trainer CRD; its Kubernetes calls (create, poll, pods, logs, delete) are checked against a recording
fake client; staging runs on a real S3 server; and, with a fake engine that runs the TrainJob's
command as real processes, 2 nodes × 1 process train the same adapter as 1 node × 2 processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from k8s_schemas import TRAINJOB_CRD, crd_validator, errors

from llmneo.cards import DistillCard
from llmneo.cluster import (
    DONE_MARKER,
    build_trainjob,
    job_state,
    put_json,
    run_distill_multinode,
    task_settings,
    upload_dir,
)
from llmneo.config import load_config
from llmneo.errors import UserError

# What KFP's driver hands a component with TaskConfig passthroughs (Go JSON of the pod fragments).
KFP_TASK_CONFIG = {
    "affinity": None,
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"},
    "env": [{"name": "LLMNEO_IMAGE", "value": "llmneo/llmneo:0.1.0"},
            {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "llmneo-s3", "key": "AWS_ACCESS_KEY_ID"}}}],
    "volumes": [{"name": "cache", "persistentVolumeClaim": {"claimName": "llmneo-cache"}}],
    "volume_mounts": [{"name": "cache", "mountPath": "/cache"}],
    "resources": {"limits": {"nvidia.com/gpu": "6", "memory": "900Gi"}, "requests": {}},
}


def multinode_cfg(**extra):
    overrides = ["distill.nnodes=2", "distill.nproc_per_node=6", "cluster.staging_uri=s3://b/stage",
                 "cluster.image=llmneo/llmneo:0.1.0"]
    return load_config("tiny", overrides + [f"{k}={v}" for k, v in extra.items()])


def test_trainjob_validates_against_the_crd_and_forwards_task_settings():
    validator = crd_validator(TRAINJOB_CRD, "v1alpha1")
    job = build_trainjob(multinode_cfg(), "llmneo-abc", "team-a", "llmneo/llmneo:0.1.0", "s3://b/stage/llmneo-abc",
                         task_settings(KFP_TASK_CONFIG))
    assert errors(validator, job) == []
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 6
    assert trainer["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": "6", "memory": "900Gi"}}
    assert trainer["command"] == ["python", "-m", "llmneo.cluster", "node", "--staging", "s3://b/stage/llmneo-abc"]
    env = {e["name"]: e for e in trainer["env"]}
    assert env["LLMNEO_IMAGE"]["value"] == "llmneo/llmneo:0.1.0"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "llmneo-s3", "key": "AWS_ACCESS_KEY_ID"}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True  # added: not forwarded by KFP
    (patch,) = job["spec"]["runtimePatches"]
    (rj,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = rj["template"]["spec"]["template"]["spec"]
    assert rj["name"] == "node" and pod["containers"][0]["name"] == "node"
    assert pod["nodeSelector"] == KFP_TASK_CONFIG["node_selector"]
    assert pod["tolerations"] == KFP_TASK_CONFIG["tolerations"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    assert {"name": "cache", "mountPath": "/cache"} in pod["containers"][0]["volumeMounts"]
    assert "affinity" not in pod  # empty fields are not sent
    assert job["spec"]["activeDeadlineSeconds"] == 72 * 3600


def test_trainjob_defaults_without_task_config_and_schema_catches_mistakes():
    validator = crd_validator(TRAINJOB_CRD, "v1alpha1")
    job = build_trainjob(multinode_cfg(), "llmneo-x", "ns", "img", "s3://b/s/llmneo-x", task_settings({}))
    assert errors(validator, job) == []
    assert job["spec"]["trainer"]["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": 6}}
    # the validation is not vacuous: a misspelt field and a missing runtimeRef are rejected
    job["spec"]["trainer"]["numNode"] = 2
    del job["spec"]["runtimeRef"]
    found = errors(validator, job)
    assert any("numNode" in e for e in found) and any("runtimeRef" in e for e in found)


def test_job_state_reads_conditions():
    assert job_state({}) == ("Running", "")
    done = {"status": {"conditions": [{"type": "Created", "status": "True"}, {"type": "Complete", "status": "True"}]}}
    assert job_state(done) == ("Complete", "")
    failed = {"status": {"conditions": [{"type": "Failed", "status": "True", "message": "node-0 OOMKilled"}]}}
    assert job_state(failed) == ("Failed", "node-0 OOMKilled")


def test_staging_uri_and_image_are_required(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMNEO_IMAGE", raising=False)
    with pytest.raises(UserError, match=r"^cluster.staging_uri: must be an s3:// URI"):
        run_distill_multinode(load_config("tiny", ["distill.nnodes=2"]), tmp_path, tmp_path, tmp_path, tmp_path)
    with pytest.raises(UserError, match=r"^cluster.image: empty and \$LLMNEO_IMAGE is not set"):
        run_distill_multinode(load_config("tiny", ["distill.nnodes=2", "cluster.staging_uri=s3://b/p"]),
                              tmp_path, tmp_path, tmp_path, tmp_path)


def test_steps_dispatches_to_the_launcher_when_nnodes_gt_1(tmp_path, monkeypatch):
    import llmneo.cluster
    from llmneo.steps import distill_student

    seen = {}
    monkeypatch.setattr(llmneo.cluster, "run_distill_multinode", lambda cfg, *args: seen.update(args=args) or {"ok": 1})
    task = {"node_selector": {"pool": "a100"}}
    assert distill_student(load_config("tiny", ["distill.nnodes=3"]), "d", "t", "s", tmp_path, task) == {"ok": 1}
    assert seen["args"] == ("d", "t", "s", tmp_path, task)  # the KFP task's settings, as an argument


# --------------------------------------------------------------------------------------------
# Recording fake Kubernetes client
# --------------------------------------------------------------------------------------------


class FakeKube:
    """Records every call; ``on_create`` simulates the engine, ``states`` the TrainJob's progress."""

    def __init__(self, states=("Running", "Complete"), message="", on_create=None, create_error=None,
                 existing=None, prune=None):
        self.calls: list[tuple] = []
        self.states, self.message, self.on_create, self.create_error = list(states), message, on_create, create_error
        self.body = None
        self.existing = existing  # a TrainJob left by an earlier attempt (find_job returns it, once)
        self.prune = prune or (lambda body: body)  # the API server's structural pruning (dry run answer)

    def find_job(self, namespace, name):
        self.calls.append(("find_job", namespace, name))
        if self.existing is not None:
            self.body = self.existing
        return self.existing

    def set_owners(self, namespace, name, owners):
        self.calls.append(("set_owners", namespace, name))
        self.body = {**self.body, "metadata": {**self.body["metadata"], "ownerReferences": owners}}

    def create_job(self, namespace, body, dry_run=False):
        self.calls.append(("dry_run_job" if dry_run else "create_job", namespace, body["metadata"]["name"]))
        if self.create_error:
            raise self.create_error
        if dry_run:
            return self.prune(json.loads(json.dumps(body)))
        self.body = body
        if self.on_create:
            self.on_create(body)
        return body

    def get_job(self, namespace, name):
        self.calls.append(("get_job", namespace, name))
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        conds = [] if state == "Running" else [{"type": state, "status": "True", "message": self.message}]
        return {**self.body, "status": {"conditions": conds}}

    def node0_pods(self, namespace, name):
        self.calls.append(("node0_pods", namespace, name))
        return [{"name": f"{name}-node-0-0-x", "uid": "uid-1", "phase": "Running"}]

    def stream_log(self, namespace, pod):
        self.calls.append(("stream_log", namespace, pod))
        yield from ["step 1 loss 3.2", "step 2 loss 3.1"]

    def delete_job(self, namespace, name):
        self.calls.append(("delete_job", namespace, name))
        self.existing = None


def staged_objects(bucket, prefix):
    from llmneo.storage.s3 import client

    pages = client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.mark.integration
def test_launcher_call_sequence_download_and_cleanup(s3_bucket, tiny_workspace, tmp_path):
    cfg = multinode_cfg(**{"cluster.staging_uri": f"s3://{s3_bucket}/stage", "cluster.namespace": "team-a",
                           "cluster.poll_seconds": 0.01})

    def engine(body):  # what node 0 leaves behind: the adapter folder and, last, the marker
        staging = body["spec"]["trainer"]["command"][-1]
        out = tmp_path / "node0"
        (out / "adapter").mkdir(parents=True)
        (out / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00" * 1000)
        DistillCard(method="neo", steps=4).write(out)
        upload_dir(out, f"{staging}/adapter")
        put_json(f"{staging}/{DONE_MARKER}", {"files": 2})

    fake = FakeKube(states=["Running", "Running", "Complete"], on_create=engine)
    lines = []
    card = run_distill_multinode(cfg, tiny_workspace / "dataset", tiny_workspace / "teacher",
                                 tiny_workspace / "student", tmp_path / "out", api=fake, job_name="llmneo-t1",
                                 log=lines.append)
    names = [c[0] for c in fake.calls]
    assert names[:3] == ["find_job", "dry_run_job", "create_job"] and names[-1] == "delete_job"
    assert names.count("stream_log") == 1  # one node-0 pod, streamed once
    assert names.index("stream_log") < names.index("delete_job")
    assert all(c[1] == "team-a" and "llmneo-t1" in c[2] for c in fake.calls)
    assert "step 2 loss 3.1" in lines and any("Complete" in line for line in lines)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").read_bytes() == b"\x00" * 1000
    assert card.extra["engine"] == "kubeflow-trainer" and card.extra["job"] == "llmneo-t1" and card.steps == 4
    assert staged_objects(s3_bucket, "stage/") == []  # staging cleaned up


@pytest.mark.integration
def test_failed_job_is_a_one_line_error_and_is_deleted(s3_bucket, tiny_workspace, tmp_path):
    cfg = multinode_cfg(**{"cluster.staging_uri": f"s3://{s3_bucket}/stage", "cluster.poll_seconds": 0.01})
    fake = FakeKube(states=["Running", "Failed"], message="node-1 exited with code 137")
    with pytest.raises(UserError, match=r"TrainJob .*/llmneo-f1 failed: node-1 exited with code 137"):
        run_distill_multinode(cfg, tiny_workspace / "dataset", tiny_workspace / "teacher",
                              tiny_workspace / "student", tmp_path / "out", api=fake, job_name="llmneo-f1",
                              log=lambda *_: None)
    assert fake.calls[-1][0] == "delete_job"
    assert staged_objects(s3_bucket, "stage/") == []


@pytest.mark.integration
def test_forbidden_create_names_the_role(s3_bucket, tiny_workspace, tmp_path):
    from kubernetes.client.exceptions import ApiException

    err = ApiException(status=403, reason="Forbidden")
    err.body = json.dumps({"message": 'trainjobs.trainer.kubeflow.org is forbidden: User "system:serviceaccount:x:y"'})
    cfg = multinode_cfg(**{"cluster.staging_uri": f"s3://{s3_bucket}/stage"})
    fake = FakeKube(create_error=err)
    with pytest.raises(UserError, match=r"Kubernetes API 403 forbidden: apply k8s/ \(Role llmneo-launcher\)"):
        run_distill_multinode(cfg, tiny_workspace / "dataset", tiny_workspace / "teacher",
                              tiny_workspace / "student", tmp_path / "out", api=fake, log=lambda *_: None)
    assert [c[0] for c in fake.calls] == ["find_job", "dry_run_job"]  # refused by the dry run: nothing to delete
    assert staged_objects(s3_bucket, "stage/") == []


# --------------------------------------------------------------------------------------------
# A fake engine that runs the TrainJob for real: N local processes with Trainer's PET_* env
# --------------------------------------------------------------------------------------------


class LocalEngine(FakeKube):
    """Runs ``trainer.command`` once per node as a local process (real torchrun, gloo, real S3)."""

    def __init__(self, tmp_path):
        super().__init__()
        self.tmp, self.procs, self.logs = tmp_path, [], []

    def create_job(self, namespace, body, dry_run=False):
        from s3server import free_ports

        if dry_run:
            return super().create_job(namespace, body, dry_run=True)
        self.calls.append(("create_job", namespace, body["metadata"]["name"]))
        self.body = body
        trainer = body["spec"]["trainer"]
        (port,) = free_ports(1)
        cmd = [sys.executable if a == "python" else a for a in trainer["command"]]
        literal = {e["name"]: e["value"] for e in trainer["env"] if "value" in e}
        for rank in range(trainer["numNodes"]):
            env = {**os.environ, **literal, "PET_NODE_RANK": str(rank), "PET_MASTER_ADDR": "127.0.0.1",
                   "PET_MASTER_PORT": str(port), "PET_NNODES": str(trainer["numNodes"]), "OMP_NUM_THREADS": "1"}
            log = open(self.tmp / f"node{rank}.log", "w")
            self.logs.append(self.tmp / f"node{rank}.log")
            self.procs.append(subprocess.Popen(cmd + ["--workdir", str(self.tmp / f"node{rank}")], env=env,
                                               stdout=log, stderr=subprocess.STDOUT))
        return body

    def get_job(self, namespace, name):
        self.calls.append(("get_job", namespace, name))
        codes = [p.poll() for p in self.procs]
        state = "Running" if None in codes else ("Complete" if not any(codes) else "Failed")
        conds = [] if state == "Running" else [{"type": state, "status": "True", "message": f"exit codes {codes}"}]
        return {**self.body, "status": {"conditions": conds}}

    def node0_pods(self, namespace, name):
        self.calls.append(("node0_pods", namespace, name))
        return [{"name": f"{name}-node-0-0", "uid": "u0", "phase": "Running" if self.procs[0].poll() is None else "Succeeded"}]

    def stream_log(self, namespace, pod):
        self.calls.append(("stream_log", namespace, pod))
        self.procs[0].wait(timeout=600)  # like `follow`: the stream ends with the container
        yield from self.logs[0].read_text().splitlines()


def adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


@pytest.mark.integration
def test_two_nodes_train_the_same_adapter_as_one_node(s3_bucket, tiny_workspace, tmp_path):
    import torch

    from llmneo.steps import distill_student

    ws = tiny_workspace
    one = distill_student(load_config("tiny", ["distill.nproc_per_node=2"]), ws / "dataset", ws / "teacher",
                      ws / "student", tmp_path / "one")
    engine = LocalEngine(tmp_path)
    cfg = load_config("tiny", ["distill.nnodes=2", "distill.nproc_per_node=1", "cluster.image=llmneo-test",
                               f"cluster.staging_uri=s3://{s3_bucket}/stage", "cluster.poll_seconds=0.2"])
    lines = []
    try:
        two = run_distill_multinode(cfg, ws / "dataset", ws / "teacher", ws / "student", tmp_path / "two",
                                    api=engine, log=lines.append)
    finally:
        for p in engine.procs:
            if p.poll() is None:
                p.kill()
    assert two.world_size == one.world_size == 2 and two.steps == one.steps
    assert two.final["loss"] == pytest.approx(one.final["loss"], abs=1e-6)
    a, b = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "two")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert any("node 0: uploaded" in line for line in lines)  # node 0's log reached the launcher
    assert engine.calls[-1][0] == "delete_job"
    assert staged_objects(s3_bucket, "stage/") == []


def test_kube_api_calls_the_official_client_with_valid_arguments():
    """KubeApi's calls bind to the real kubernetes client signatures; pod logs are split into lines
    across chunk boundaries; the selector finds node 0 of the TrainJob's JobSet."""
    import inspect
    from types import SimpleNamespace

    from kubernetes import client

    from llmneo.cluster import KubeApi

    calls = []

    class Recorder:
        def __init__(self, real_cls, results):
            self.real_cls, self.results = real_cls, results

        def __getattr__(self, name):
            def call(*args, **kwargs):
                method = getattr(self.real_cls, name)
                inspect.signature(method).bind(None, *args, **kwargs)  # positional arguments
                documented = set(re.findall(r":param \w+ (\w+):", method.__doc__))  # what the client accepts
                assert set(kwargs) <= documented | {"_preload_content", "_request_timeout"}, (name, kwargs)
                calls.append((name, args, kwargs))
                return self.results.get(name)
            return call

    class Stream:
        released = False

        def stream(self, amt):
            yield from [b"step 1 lo", b"ss 3.2\nstep 2 loss 3.1\nlast line", b""]

        def release_conn(self):
            Stream.released = True

    pod = SimpleNamespace(metadata=SimpleNamespace(name="j-node-0-0-abc", uid="u1"), status=SimpleNamespace(phase="Running"))
    api = KubeApi.__new__(KubeApi)
    api.custom = Recorder(client.CustomObjectsApi, {"get_namespaced_custom_object": {"status": {}}})
    api.core = Recorder(client.CoreV1Api, {"list_namespaced_pod": SimpleNamespace(items=[pod]),
                                           "read_namespaced_pod_log": Stream()})
    api.create_job("ns", {"kind": "TrainJob"}, dry_run=True)
    api.create_job("ns", {"kind": "TrainJob"})
    api.get_job("ns", "j")
    api.set_owners("ns", "j", [{"apiVersion": "v1", "kind": "Pod", "name": "p", "uid": "u"}])
    assert api.node0_pods("ns", "j") == [{"name": "j-node-0-0-abc", "uid": "u1", "phase": "Running"}]
    assert list(api.stream_log("ns", "j-node-0-0-abc")) == ["step 1 loss 3.2", "step 2 loss 3.1", "last line"]
    assert Stream.released
    api.delete_job("ns", "j")
    names = [c[0] for c in calls]
    assert names == ["create_namespaced_custom_object", "create_namespaced_custom_object",
                     "get_namespaced_custom_object", "patch_namespaced_custom_object", "list_namespaced_pod",
                     "read_namespaced_pod_log", "delete_namespaced_custom_object"]
    assert calls[0][1][:4] == ("trainer.kubeflow.org", "v1alpha1", "ns", "trainjobs")
    assert calls[0][2] == {"dry_run": "All"} and calls[1][2] == {}  # the check, then the real create
    assert calls[3][1][-1] == {"metadata": {"ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "p",
                                                                  "uid": "u"}]}}
    selector = calls[4][2]["label_selector"]
    assert "jobset.sigs.k8s.io/jobset-name=j" in selector and "job-completion-index=0" in selector
    assert calls[5][2]["follow"] is True and calls[5][2]["container"] == "node"
    assert calls[6][2]["propagation_policy"] == "Foreground"


# --------------------------------------------------------------------------------------------
# Backend rules: Trainer version floor, ownership, re-attach after a retry, Istio, fsGroup
# --------------------------------------------------------------------------------------------


def prune_to(schema: dict):
    """The API server's structural pruning (apiextensions: fields not in a structural CRD schema are
    dropped silently on create, dry run included), for one CRD version's openAPIV3Schema."""
    def prune(node, sch):
        if not isinstance(node, dict) or sch.get("x-kubernetes-preserve-unknown-fields"):
            if isinstance(node, list) and "items" in sch:
                return [prune(v, sch["items"]) for v in node]
            return node
        props = sch.get("properties")
        if props is None:
            extra = sch.get("additionalProperties")
            return {k: prune(v, extra) for k, v in node.items()} if isinstance(extra, dict) else node
        return {k: prune(v, props[k]) for k, v in node.items() if k in props or k in ("apiVersion", "kind")}

    return lambda body: prune(body, schema)


def trainjob_schema(older: bool = False) -> dict:
    """The TrainJob v1alpha1 schema from ../shared/schemas (Trainer main); ``older``: as Trainer v2.1.0's
    CRD has it, without runtimePatches and activeDeadlineSeconds (both came in v2.2.0)."""
    import copy

    import yaml
    from k8s_schemas import SCHEMAS

    if not (SCHEMAS / TRAINJOB_CRD).is_file():
        pytest.skip(f"{SCHEMAS / TRAINJOB_CRD} not found: the CRD schemas live in the shared folder")
    (crd,) = [d for d in yaml.safe_load_all((SCHEMAS / TRAINJOB_CRD).read_text()) if d]
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema = copy.deepcopy(ver["schema"]["openAPIV3Schema"])
    if older:
        for field in ("runtimePatches", "activeDeadlineSeconds"):
            del schema["properties"]["spec"]["properties"][field]
    return schema


def test_trainer_older_than_v2_2_is_refused_before_anything_is_staged(tmp_path):
    """Upstream rule (kubeflow/trainer: runtimePatches replaced podTemplateOverrides in 38d8243cf,
    first in v2.2.0; spec.activeDeadlineSeconds is also absent from v2.1.0's
    manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml): a v2.1 API server prunes those fields
    silently — no tolerations, node selector, /dev/shm, deadline. A dry-run create shows what is kept."""
    from llmneo.cluster import REQUIRED_FIELDS, check_trainer

    cfg = multinode_cfg()
    body = build_trainjob(cfg, "j", "ns", "img", "s3://b/stage/j", task_settings(KFP_TASK_CONFIG))
    check_trainer(FakeKube(prune=prune_to(trainjob_schema())), "ns", body)  # current Trainer: all kept
    old = FakeKube(prune=prune_to(trainjob_schema(older=True)))
    with pytest.raises(UserError, match=r"drops spec.runtimePatches, spec.activeDeadlineSeconds .*Trainer >= v2.2"):
        check_trainer(old, "ns", body)
    assert [c[0] for c in old.calls] == ["dry_run_job"]
    assert REQUIRED_FIELDS == ("spec.runtimePatches", "spec.activeDeadlineSeconds")
    # in the launcher: refused before any staging upload or real create (no S3 needed to get there)
    with pytest.raises(UserError, match=r"Trainer >= v2.2"):
        run_distill_multinode(multinode_cfg(), tmp_path, tmp_path, tmp_path, tmp_path / "out",
                              api=FakeKube(prune=prune_to(trainjob_schema(older=True))), log=lambda *_: None)


def test_trainjob_is_owned_by_the_launcher_pod_and_named_after_the_run(monkeypatch):
    """No orphan: the launcher pod (downward API POD_NAME/POD_UID) owns the TrainJob, and the name is
    deterministic per run (Argo workflow) and configuration, so a retry finds the same job."""
    from llmneo.cluster import launcher_owner, trainjob_name

    env = {"POD_NAME": "llm-neo-abc-system-container-impl-1", "POD_UID": "uid-1", "LLMNEO_WORKFLOW": "llm-neo-abc"}
    owner = launcher_owner(env)
    assert owner == {"apiVersion": "v1", "kind": "Pod", "name": env["POD_NAME"], "uid": "uid-1"}
    job = build_trainjob(multinode_cfg(), "j", "ns", "img", "s3://b/p", {}, owner=owner)
    assert job["metadata"]["ownerReferences"] == [owner]
    assert errors(crd_validator(TRAINJOB_CRD, "v1alpha1"), job) == []
    cfg = multinode_cfg()
    name = trainjob_name(cfg, env)
    assert name == trainjob_name(cfg, dict(env, POD_NAME="retry-pod", POD_UID="uid-2"))  # a retry: same job
    assert name != trainjob_name(cfg, dict(env, LLMNEO_WORKFLOW="llm-neo-other"))  # another run
    assert name != trainjob_name(multinode_cfg(**{"distill.alpha": 0.1}), env)  # another configuration
    assert re.fullmatch(r"llmneo-[0-9a-f]{12}", name)
    assert launcher_owner({}) is None and trainjob_name(cfg, {}) != trainjob_name(cfg, {})  # off-cluster: random


def test_trainjob_pods_skip_istio_and_own_their_volumes():
    job = build_trainjob(multinode_cfg(), "j", "ns", "img", "s3://b/p", task_settings(KFP_TASK_CONFIG))
    template = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]
    assert template["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"
    assert template["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert template["spec"]["securityContext"]["fsGroup"] == 1000


def test_a_retry_reattaches_to_the_running_job_instead_of_starting_a_second(monkeypatch, tmp_path):
    from llmneo import cluster

    cfg = multinode_cfg(**{"cluster.poll_seconds": 0.01})
    monkeypatch.setenv("POD_NAME", "retry-pod")
    monkeypatch.setenv("POD_UID", "uid-2")
    first_owner = {"apiVersion": "v1", "kind": "Pod", "name": "first-pod", "uid": "uid-1"}
    earlier = build_trainjob(cfg, "llmneo-r1", "ns", "img", "s3://b/stage/llmneo-r1", {}, owner=first_owner)
    fake = FakeKube(states=["Running", "Complete"], existing=earlier)
    monkeypatch.setattr(cluster, "get_json", lambda uri: {"files": 1})
    monkeypatch.setattr(cluster, "download_prefix", lambda uri, out: (Path(out) / "card.json").write_text(
        json.dumps({"kind": "adapter", "method": "neo", "steps": 3})))
    monkeypatch.setattr(cluster, "delete_prefix", lambda uri: 0)
    card = run_distill_multinode(cfg, tmp_path, tmp_path, tmp_path, tmp_path / "out", api=fake, job_name="llmneo-r1",
                                 log=lambda *_: None)
    names = [c[0] for c in fake.calls]
    assert "create_job" not in names and "dry_run_job" not in names  # no second job, nothing re-staged
    assert names[:2] == ["find_job", "set_owners"]
    assert [o["uid"] for o in fake.body["metadata"]["ownerReferences"]] == ["uid-1", "uid-2"]
    assert card.steps == 3 and card.extra["job"] == "llmneo-r1"


def test_a_failed_job_of_an_earlier_attempt_is_replaced(monkeypatch, tmp_path):
    from llmneo.cluster import _attach

    cfg = multinode_cfg()
    earlier = {**build_trainjob(cfg, "llmneo-r2", "ns", "img", "s3://b/p", {}),
               "status": {"conditions": [{"type": "Failed", "status": "True", "message": "OOM"}]}}
    fake = FakeKube(existing=earlier)
    assert _attach(fake, "ns", "llmneo-r2", None, log=lambda *_: None) is False  # the caller creates afresh
    assert [c[0] for c in fake.calls] == ["find_job", "delete_job", "find_job"]


def test_trainjob_nodes_run_with_a_read_only_root_filesystem():
    """Least privilege: restricted securityContext and a read-only root; every path a node writes is
    a volume (/tmp = the work folder, $HOME, /cache unless the task forwards its cache volume)."""
    validator = crd_validator(TRAINJOB_CRD, "v1alpha1")
    for task, cache_volume in ((task_settings(KFP_TASK_CONFIG), "cache"), (None, "node-cache")):
        job = build_trainjob(multinode_cfg(), "llmneo-abc", "team-a", "llmneo/llmneo:0.1.0", "s3://b/stage/x", task)
        assert errors(validator, job) == []
        (patch,) = job["spec"]["runtimePatches"]
        (rj,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
        pod = rj["template"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"}, "readOnlyRootFilesystem": True}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts["/tmp"] == "work" and mounts["/home/llmneo"] == "home" and mounts["/cache"] == cache_volume
        assert mounts["/dev/shm"] == "dshm"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert set(mounts.values()) <= set(volumes)  # every mount has its volume
        assert volumes["work"] == {"name": "work", "emptyDir": {}} and volumes["home"] == {"name": "home", "emptyDir": {}}


def test_trainjob_is_built_through_kubeflow_trainer_api_models():
    """The TrainJob goes through kubeflow-trainer-api's typed models (generated from Kubeflow Trainer's
    Go types): what they keep is what is sent, and a field they do not have — a typo, or a KFP task
    setting of a newer Kubernetes — fails at build time instead of being pruned silently by the API
    server (structural CRD pruning). The models cover every field used, runtimePatches included."""
    from importlib.metadata import version

    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    from llmneo.cluster import typed_trainjob

    body = build_trainjob(multinode_cfg(), "j", "ns", "img", "s3://b/p", task_settings(KFP_TASK_CONFIG))
    assert TrainerV1alpha1TrainJob.from_dict(body).to_dict() == body  # nothing dropped or changed
    assert body["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert version("kubeflow-trainer-api") == "2.3.0"  # = pyproject.toml / requirements.lock

    bad_volume = dict(KFP_TASK_CONFIG, volumes=[{"name": "c", "persistentVolumeClame": {"claimName": "x"}}])
    with pytest.raises(UserError, match=r"^TrainJob: spec.runtimePatches\[0\].trainingRuntimeSpec.template.spec."
                                        r"replicatedJobs\[0\].template.spec.template.spec.volumes\[\d+\]."
                                        r"persistentVolumeClame: not in Kubeflow Trainer's TrainJob API"):
        build_trainjob(multinode_cfg(), "j", "ns", "img", "s3://b/p", task_settings(bad_volume))
    typo = json.loads(json.dumps(body))
    typo["spec"]["trainer"]["numNode"] = 2
    with pytest.raises(UserError, match=r"^TrainJob: spec.trainer.numNode: not in"):
        typed_trainjob(typo)
    typo = json.loads(json.dumps(body))
    typo["spec"]["trainer"]["numNodes"] = "two"
    with pytest.raises(UserError, match=r"^TrainJob: not valid for Kubeflow Trainer's API: "):
        typed_trainjob(typo)


def test_no_owner_reference_across_namespaces():
    """Upstream rule (kubernetes pkg/controller/garbagecollector/garbagecollector.go attemptToDeleteItem
    → isDangling): a namespaced owner is looked up in the dependent's namespace; absent there, the
    dependent is deleted at once. A TrainJob in another namespace than the launcher pod's (set by
    cluster.namespace) therefore gets no owner reference."""
    from llmneo.cluster import POD_IDENTITY_ENV, launcher_owner

    pod = {"POD_NAME": "launcher-1", "POD_UID": "u-1", "POD_NAMESPACE": "team-a"}
    assert launcher_owner(pod, "team-a") == {"apiVersion": "v1", "kind": "Pod", "name": "launcher-1", "uid": "u-1"}
    assert launcher_owner(pod, "team-b") is None
    assert launcher_owner(pod) is not None
    assert POD_IDENTITY_ENV["POD_NAMESPACE"] == "metadata.namespace"  # the pipeline sets it (downward API)
