"""What a step does inside a Kubeflow pod when the cluster set-up is incomplete: one ``error:`` line
naming what is missing, never a silent fallback."""

import os

import pytest

from llmneo.errors import UserError
from llmneo.storage.s3 import S3Store, check_pod_credentials

POD = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}


def test_s3_in_a_pod_without_the_secret_fails_in_one_line(monkeypatch):
    """Upstream rule: the pipeline mounts llmneo-s3 with ``optional: true`` (kfp-kubernetes
    use_secret_as_env → the pod's secretKeyRef.optional), so a missing Secret gives a pod without the
    variables, and botocore's chain (botocore/credentials.py create_credential_resolver) then falls
    through to the container provider and InstanceMetadataProvider: the node's IAM role on EKS. The
    step refuses before the first call instead."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    with pytest.raises(UserError, match=r"^registry.uri: no S3 credentials in this pod: the Secret llmneo-s3 "
                                        r"\(keys AWS_ACCESS_KEY_ID, .*kubectl create secret generic llmneo-s3"):
        S3Store("s3://models/registry", "registry.uri").list()


@pytest.mark.parametrize("env", [
    {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"},     # the Secret llmneo-s3
    {"AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/secrets/eks.amazonaws.com/serviceaccount/token"},  # IRSA
    {"AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://169.254.170.23/v1/credentials"},  # EKS Pod Identity
])
def test_pod_credentials_of_the_pods_own_are_accepted(env):
    check_pod_credentials("x", {**POD, **env})


def test_half_a_key_pair_or_no_pod_is_judged_right():
    with pytest.raises(UserError, match="no S3 credentials in this pod"):
        check_pod_credentials("x", {**POD, "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": ""})
    check_pod_credentials("x", {})  # outside Kubernetes: botocore's chain as usual (profiles, SSO...)


def test_gpus_requested_but_not_visible_fail_in_one_line():
    """Upstream rule (GoogleCloudPlatform/container-engine-accelerators, the GKE NVIDIA device plugin
    cmd/nvidia_gpu/nvidia_gpu.go: host driver dir mounted at container path /usr/local/nvidia): the
    driver's libcuda is only found through LD_LIBRARY_PATH=/usr/local/nvidia/lib64 (set by the
    nvidia/cuda images, and by images/Dockerfile); without it torch sees 0 devices and the trainer used
    to fall back to CPU/gloo. A step given GPUs (distill_gpus > 0 → $LLMNEO_GPUS) refuses instead."""
    from llmneo.preflight import check_gpus

    with pytest.raises(UserError, match=r"^distill: 6 GPUs needed \(LLMNEO_GPUS=6, 6 processes on this node\) but "
                                        r"torch.cuda.device_count\(\) = 0; CUDA_VISIBLE_DEVICES=\(unset\), driver "
                                        r"folder none of /usr/local/nvidia/lib64, /usr/local/nvidia/lib, "
                                        r"LD_LIBRARY_PATH=\(unset\)"):
        check_gpus({"LLMNEO_GPUS": "6", "LOCAL_WORLD_SIZE": "6"}, lambda: 0)
    # more processes than visible GPUs: two ranks would share one, or run on the CPU
    with pytest.raises(UserError, match=r"^distill: 8 GPUs needed .* = 6;"):
        check_gpus({"LOCAL_WORLD_SIZE": "8"}, lambda: 6)
    check_gpus({"LLMNEO_GPUS": "6", "LOCAL_WORLD_SIZE": "6"}, lambda: 8)
    check_gpus({"LOCAL_WORLD_SIZE": "2"}, lambda: 0)  # a CPU run (gloo) nobody asked GPUs for


def test_cuda_image_puts_gkes_driver_folder_on_the_loader_path():
    from conftest import REPO

    text = (REPO / "images" / "Dockerfile").read_text()
    assert "ENV LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/local/nvidia/lib" in text


def test_distill_step_exports_the_requested_gpus(monkeypatch, tmp_path):
    from kfp import dsl

    import llmneo.steps
    from llmneo.cards import DistillCard
    from llmneo_components.distill import distill

    seen = {}

    def fake(cfg, *args, **kwargs):
        import os

        seen["gpus"] = os.environ.get("LLMNEO_GPUS")
        return DistillCard(method="neo", steps=1, final={"loss": 1.0}, tokens_per_s=1.0, trainable_parameters=1,
                           wall_seconds=1.0)

    monkeypatch.setattr(llmneo.steps, "distill_student", fake)
    monkeypatch.delenv("LLMNEO_GPUS", raising=False)
    art = {k: dsl.Model(uri=str(tmp_path / k)) for k in ("dataset", "teacher", "student", "adapter")}
    for a in art.values():
        a.path = a.uri
    distill.python_func(preset="tiny", overrides=[], config="", gpus="6", nodes=1, dataset=art["dataset"],
                        teacher=art["teacher"], student=art["student"], adapter=art["adapter"],
                        metrics=dsl.Metrics(uri=str(tmp_path / "m")))
    assert seen["gpus"] == "6"
    # only for the step's own training: a step run in-process (kfp.local, tests) leaves no GPU request
    # behind for the next CPU run in the same process
    assert "LLMNEO_GPUS" not in os.environ


def test_first_run_checklist_covers_the_set_up_in_order_with_commands_that_parse():
    """docs/kubeflow.md's first-run checklist: images, profile, volume, secrets, upload, a UI run with
    the defaults, a scheduled run — and each ``llmneo`` command in it is accepted by the CLI."""
    import re
    import shlex

    from conftest import REPO
    from llmneo_pipelines.cli import build_parser

    text = (REPO / "docs" / "kubeflow.md").read_text()
    section = text[text.index("## First run: a checklist"):text.index("\n## ", text.index("## First run") + 5)]
    titles = re.findall(r"^\d\. \*\*([^*]+)\*\*", section, flags=re.M)
    assert titles == ["Images", "Profile", "Volume, RBAC, schedule sync", "Secrets", "Upload",
                      "A UI run with the defaults", "A scheduled run"]
    commands = [re.sub(r"\s*#.*$", "", c.replace("\\\n", " ")) for c in
                re.findall(r"^\s*(llmneo (?:[^\n]*\\\n)*[^\n]*)", section, flags=re.M)]
    assert len(commands) == 2
    for command in commands:
        args = build_parser().parse_args(shlex.split(command.replace("$LLMNEO_IMAGE_REGISTRY", "r"))[1:])
        assert args.fn
    assert "skipped: no s3 registry" in section and "kubectl -n llmneo create secret generic llmneo-s3" in section


def test_a_cache_volume_the_step_cannot_write_fails_in_one_line(tmp_path, monkeypatch, capsys):
    """Upstream rule: kfp-kubernetes' executor config (kubeflow/pipelines
    kubernetes_platform/proto/kubernetes_executor_config.proto KubernetesExecutorConfig) has no pod
    securityContext, so a step pod gets no fsGroup, and only fsGroup makes the kubelet give a volume to
    the pod's group (kubernetes pkg/volume/volume_linux.go SetVolumeOwnership). A root-owned volume is
    then read-only to the image's uid 1000: every step checks it first, in one line."""
    from llmneo.preflight import check_cache_writable
    from llmneo_components import params

    cache = tmp_path / "cache"
    cache.mkdir()
    check_cache_writable(str(cache))
    check_cache_writable(str(tmp_path / "not-mounted"))  # no volume: nothing to check
    cache.chmod(0o555)

    def denied(*args, **kwargs):  # what uid 1000 gets on a root-owned 755 volume (root here writes anywhere)
        raise PermissionError(13, "Permission denied")

    if __import__("os").geteuid() == 0:
        monkeypatch.setattr("tempfile.NamedTemporaryFile", denied)
    try:
        with pytest.raises(UserError, match=r"cache: the cache volume \(PVC llmneo-cache\) is not writable by uid "
                                            r"\d+ \(owner \d+:\d+, mode 555; Permission denied\): run the one-shot "
                                            r"Job in k8s/cache-owner"):
            check_cache_writable(str(cache))
        monkeypatch.setattr(params, "CACHE_DIR", str(cache))
        monkeypatch.setenv("KFP_POD_NAME", "pod-1")
        with pytest.raises(SystemExit) as exc:
            params.load_run_config("tiny", [])
        assert exc.value.code == 2 and capsys.readouterr().err.startswith("error: ")
    finally:
        cache.chmod(0o755)


def test_cache_owner_job_owns_the_pvc_for_uid_1000():
    import subprocess

    import yaml

    from conftest import REPO

    (job,) = [o for o in yaml.safe_load_all(subprocess.run(["kubectl", "kustomize", str(REPO / "k8s" / "cache-owner")],
              capture_output=True, text=True, check=True).stdout) if o]
    spec = job["spec"]["template"]["spec"]
    assert job["kind"] == "Job" and job["metadata"]["namespace"] == "llmneo"
    assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == "llmneo-cache"
    assert "chown 1000:1000 /cache" in spec["containers"][0]["command"][-1]
    assert not spec["containers"][0]["image"].startswith("llmneo/")  # renamed into a registry


def test_checkpoints_of_runs_that_failed_for_good_are_pruned_by_age(tmp_path, capsys):
    """Retention of /cache/checkpoints/<run>/<fingerprint>: a run folder in which nothing was written
    for longer than the limit is listed (dry run) or removed; the current run's folder and recent
    ones stay; the sizes are those of the files."""
    import os
    import time

    from llmneo.launch import prune_checkpoints, stale_checkpoints
    from llmneo_pipelines.cli import main

    now = time.time()
    root = tmp_path / "checkpoints"
    for run, days in (("old-run", 20), ("current", 30), ("recent", 1)):
        f = root / run / "fp" / "step_2" / "state.bin"
        f.parent.mkdir(parents=True)
        f.write_bytes(b"x" * 1000)
        for p in (f, f.parent, f.parent.parent, root / run):
            os.utime(p, (now - days * 86400, now - days * 86400))
    stale = stale_checkpoints(root, 14, keep=root / "current" / "fp", now=now)
    assert [(s.path.name, round(s.age_days), s.size_bytes) for s in stale] == [("old-run", 20, 1000)]
    assert main(["prune-checkpoints", "--root", str(root), "--days", "14", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would remove {root}/current" in out and f"would remove {root}/old-run" in out and "recent" not in out
    assert (root / "old-run").exists()
    prune_checkpoints(root, 14, keep=root / "current" / "fp", log=lambda line: None)
    assert sorted(p.name for p in root.iterdir()) == ["current", "recent"]
