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

import pytest
from k8s_schemas import TRAINJOB_CRD, crd_validator, errors

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
    monkeypatch.setattr(llmneo.cluster, "run_distill_multinode", lambda cfg, *dirs: seen.update(dirs=dirs) or {"ok": 1})
    assert distill_student(load_config("tiny", ["distill.nnodes=3"]), "d", "t", "s", tmp_path) == {"ok": 1}
    assert seen["dirs"] == ("d", "t", "s", tmp_path)


# --------------------------------------------------------------------------------------------
# Recording fake Kubernetes client
# --------------------------------------------------------------------------------------------


class FakeKube:
    """Records every call; ``on_create`` simulates the engine, ``states`` the TrainJob's progress."""

    def __init__(self, states=("Running", "Complete"), message="", on_create=None, create_error=None):
        self.calls: list[tuple] = []
        self.states, self.message, self.on_create, self.create_error = list(states), message, on_create, create_error
        self.body = None

    def create_job(self, namespace, body):
        self.calls.append(("create_job", namespace, body["metadata"]["name"]))
        if self.create_error:
            raise self.create_error
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


def staged_objects(bucket, prefix):
    from llmneo.s3 import client

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
        (out / "card.json").write_text(json.dumps({"kind": "adapter", "method": "neo", "steps": 4}))
        upload_dir(out, f"{staging}/adapter")
        put_json(f"{staging}/{DONE_MARKER}", {"files": 2})

    fake = FakeKube(states=["Running", "Running", "Complete"], on_create=engine)
    lines = []
    card = run_distill_multinode(cfg, tiny_workspace / "dataset", tiny_workspace / "teacher",
                                 tiny_workspace / "student", tmp_path / "out", api=fake, job_name="llmneo-t1",
                                 log=lines.append)
    names = [c[0] for c in fake.calls]
    assert names[0] == "create_job" and names[-1] == "delete_job"
    assert names.count("stream_log") == 1  # one node-0 pod, streamed once
    assert names.index("stream_log") < names.index("delete_job")
    assert all(c[1] == "team-a" and "llmneo-t1" in c[2] for c in fake.calls)
    assert "step 2 loss 3.1" in lines and any("Complete" in line for line in lines)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").read_bytes() == b"\x00" * 1000
    assert card["engine"] == "kubeflow-trainer" and card["job"] == "llmneo-t1" and card["steps"] == 4
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
    assert [c[0] for c in fake.calls] == ["create_job"]  # nothing to delete
    assert staged_objects(s3_bucket, "stage/") == []


# --------------------------------------------------------------------------------------------
# A fake engine that runs the TrainJob for real: N local processes with Trainer's PET_* env
# --------------------------------------------------------------------------------------------


class LocalEngine(FakeKube):
    """Runs ``trainer.command`` once per node as a local process (real torchrun, gloo, real S3)."""

    def __init__(self, tmp_path):
        super().__init__()
        self.tmp, self.procs, self.logs = tmp_path, [], []

    def create_job(self, namespace, body):
        from s3server import free_ports

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
    assert two["world_size"] == one["world_size"] == 2 and two["steps"] == one["steps"]
    assert two["final"]["loss"] == pytest.approx(one["final"]["loss"], abs=1e-6)
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
    api.create_job("ns", {"kind": "TrainJob"})
    api.get_job("ns", "j")
    assert api.node0_pods("ns", "j") == [{"name": "j-node-0-0-abc", "uid": "u1", "phase": "Running"}]
    assert list(api.stream_log("ns", "j-node-0-0-abc")) == ["step 1 loss 3.2", "step 2 loss 3.1", "last line"]
    assert Stream.released
    api.delete_job("ns", "j")
    names = [c[0] for c in calls]
    assert names == ["create_namespaced_custom_object", "get_namespaced_custom_object", "list_namespaced_pod",
                     "read_namespaced_pod_log", "delete_namespaced_custom_object"]
    assert calls[0][1][:4] == ("trainer.kubeflow.org", "v1alpha1", "ns", "trainjobs")
    selector = calls[2][2]["label_selector"]
    assert "jobset.sigs.k8s.io/jobset-name=j" in selector and "job-completion-index=0" in selector
    assert calls[3][2]["follow"] is True and calls[3][2]["container"] == "node"
    assert calls[4][2]["propagation_policy"] == "Foreground"
