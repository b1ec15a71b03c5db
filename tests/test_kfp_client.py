"""`llmneo upload` / `llmneo submit` against a recording fake kfp.Client: versions with descriptions,
idempotent re-upload, run parameters (configuration validated locally, pool file, --param), URLs."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest
import yaml
from kfp_fake import FakeKfp

from conftest import REPO
from llmneo.errors import UserError
from llmneo_pipelines import kfp_client


@pytest.fixture(autouse=True)
def image_registry(monkeypatch):
    """The packaged pipeline names the default images, refused without a registry of one's own."""
    monkeypatch.setenv("LLMNEO_IMAGE_REGISTRY", "registry.example.com/team")


GKE_POOL = REPO / "k8s" / "overlays" / "gke-a100" / "pool.yaml"
S3 = "registry.uri=s3://models/registry"  # a run's registry must outlive the register pod


def test_pipeline_name_matches_the_dag():
    from llmneo_pipelines.llm_neo import PIPELINE_NAME

    assert kfp_client.PIPELINE_NAME == PIPELINE_NAME
    assert kfp_client.package_path().read_text() == (REPO / "pipelines" / "llm_neo.yaml").read_text()


def test_upload_creates_pipeline_and_version_then_is_idempotent():
    """Upstream rule (kubeflow/pipelines 2.17.0, backend/src/apiserver/server/pipeline_upload_server.go
    uploadPipeline): the upload endpoint creates the pipeline *and* a first version named after it;
    CreatePipeline (pipeline_server.go) creates the pipeline alone. The first upload must leave exactly
    one version, ours."""
    fake = FakeKfp()
    first = kfp_client.upload(fake, version="0.1.0")
    assert first["created"] and first["version"] == "0.1.0"
    assert not [c for c in fake.calls if c[0] == "upload_pipeline"]
    (up,) = [c for c in fake.calls if c[0] == "create_pipeline"]
    assert up[1] == "llm-neo" and up[2].startswith("LLM-NEO: distill a teacher LLM")  # the DAG's description
    assert [v.display_name for v in fake.versions[first["pipeline_id"]]] == ["0.1.0"]  # no extra "llm-neo" version
    (ver,) = [c for c in fake.calls if c[0] == "upload_pipeline_version"]
    assert ver[1] == "0.1.0" and ver[2] == first["pipeline_id"] and ver[3].startswith("llmneo 0.1.0: LLM-NEO")
    fake.calls.clear()
    again = kfp_client.upload(fake, version="0.1.0")
    assert not again["created"] and again["version_id"] == first["version_id"]
    assert fake.mutations() == []  # nothing uploaded twice


def test_default_version_name_is_a_content_hash(tmp_path):
    fake = FakeKfp()
    a = kfp_client.upload(fake)
    changed = tmp_path / "p.yaml"
    changed.write_text(kfp_client.package_path().read_text().replace("llmneo/llmneo:", "registry.example.com/x/llmneo:"))
    b = kfp_client.upload(fake, package=changed)
    assert a["version"].startswith("0.1.0-") and b["version"] != a["version"] and b["created"]
    assert kfp_client.upload(fake)["created"] is False


def test_submit_sends_validated_parameters_and_returns_the_url():
    fake = FakeKfp()
    pool = kfp_client.read_pool(GKE_POOL)
    result = kfp_client.submit(fake, "http://kfp.example:8080/", "smollm2-demo", ["distill.alpha=0.9"], pool,
                               {"distill_nodes": 1, "eval_gpus": 0, "registry_uri": "s3://models/registry"},
                               run_name="r1")
    (run,) = fake.runs
    from llmneo.config import dump_yaml, load_config

    assert run["params"] == {"preset": "smollm2-demo", "overrides": ["distill.alpha=0.9"], "max_kl_to_teacher": 1e6,
                             "config": dump_yaml(load_config("smollm2-demo", ["distill.alpha=0.9"])),
                             "distill_gpus": "6", "eval_gpus": "0", "distill_nodes": 1,
                             "registry_uri": "s3://models/registry",
                             "gpu_node_selector": {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"},
                             "gpu_tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
    assert run["package"].endswith("/llm_neo.yaml") and run["service_account"] == "llmneo-pipeline"
    assert run["images"] == ["registry.example.com/team/llmneo-cpu:0.1.0", "registry.example.com/team/llmneo:0.1.0"]
    assert run["experiment_id"] == "exp-llmneo" and run["job_name"] == "r1"
    assert result["url"] == f"http://kfp.example:8080/#/runs/details/{result['run_id']}"


def test_submit_an_uploaded_version():
    fake = FakeKfp()
    up = kfp_client.upload(fake, version="0.1.0")
    kfp_client.submit(fake, "http://h", "tiny", [S3], version="0.1.0")
    (run,) = fake.runs
    assert (run["pipeline_id"], run["version_id"], run["package"]) == (up["pipeline_id"], up["version_id"], None)
    with pytest.raises(UserError, match=r"^pipeline llm-neo: no version 9.9: run `llmneo upload --version 9.9`"):
        kfp_client.submit(fake, "http://h", "tiny", [S3], version="9.9")


@pytest.mark.parametrize("overrides, params, message", [
    (["distill.alpha=3"], {}, r"^distill.alpha: must be <= 1.0"),
    ([], {"distil_gpus": 2}, r"^parameter distil_gpus: not a pipeline parameter; known: config, distill_gpus"),
    ([], {"distill_nodes": "two"}, r"^parameter distill_nodes: expected number_integer, got 'two'"),
    ([], {"distill_gpus": [6]}, r"^parameter distill_gpus: expected string, got \[6\]"),
    ([], {"config": "distill: {}"}, r"^parameter config: use --preset / key=value overrides"),
    ([], {"gpu_tolerations": {"key": "x"}}, r"^parameter gpu_tolerations: expected list"),
    ([], {"distill_nodes": 2}, r"^cluster.staging_uri: set an s3:// prefix for distill_nodes=2"),
    ([], {}, r"^registry.uri: 'runs/registry' would be a folder inside the register step's pod, lost when the pod "
             r"ends: set registry.uri=s3://BUCKET/PREFIX or --param registry_uri=s3://BUCKET/PREFIX$"),
    (["registry.uri=/mnt/models"], {}, r"^registry.uri: '/mnt/models' would be a folder inside"),
    ([S3], {"registry_uri": "file:///models"}, r"^registry.uri: 'file:///models' would be a folder inside"),
])
def test_submit_fails_locally_before_any_call(overrides, params, message):
    """The registry cases: a KFP task's pod has no file system that outlives it (only volumes and output
    artifacts do), so register into a folder keeps nothing; a run needs an s3:// registry."""
    fake = FakeKfp()
    with pytest.raises(UserError, match=message):
        kfp_client.submit(fake, "http://h", "tiny", overrides, params=params)
    assert fake.calls == []


def test_multinode_submit_with_staging():
    fake = FakeKfp()
    kfp_client.submit(fake, "http://h", "tiny", ["cluster.staging_uri=s3://b/stage", S3], params={"distill_nodes": 2})
    assert fake.runs[0]["params"]["distill_nodes"] == 2


def test_cli_submit_prints_the_run_url(monkeypatch, capsys, tmp_path):
    from llmneo_pipelines.cli import main

    fake = FakeKfp()
    monkeypatch.setattr(kfp_client, "connect", lambda host, namespace=None: fake)
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump({"distill_gpus": 2}))
    assert main(["submit", "--host", "http://kfp:8080", "--preset", "tiny", "--pool-file", str(pool),
                 "--param", "eval_gpus=0", "--run-name", "cli-run", "distill.max_steps=2", S3]) == 0
    out = capsys.readouterr().out
    assert "run cli-run (id-1): http://kfp:8080/#/runs/details/id-1" in out
    assert fake.runs[0]["params"]["distill_gpus"] == "2" and fake.runs[0]["params"]["overrides"] == ["distill.max_steps=2", S3]
    assert main(["upload", "--host", "http://kfp:8080", "--version", "0.1.0"]) == 0
    assert "uploaded llm-neo version 0.1.0" in capsys.readouterr().out


def test_cli_errors_are_one_line():
    proc = subprocess.run([sys.executable, "-m", "llmneo_pipelines.cli", "submit", "--host", "http://127.0.0.1:9", "--preset",
                           "tiny", "--param", "distill_nodes=2"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: cluster.staging_uri: set an s3:// prefix for distill_nodes=2 (the TrainJob's "
                                   "nodes exchange inputs and the adapter there)")
    proc = subprocess.run([sys.executable, "-m", "llmneo_pipelines.cli", "submit", "--preset", "tiny", S3], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                               "LLMNEO_IMAGE_REGISTRY": "registry.example.com/team"})
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --host: the Kubeflow Pipelines URL is required")


def test_unreachable_host_with_the_real_client_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "llmneo_pipelines.cli", "upload", "--host", "http://127.0.0.1:9"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: connect to http://127.0.0.1:9: cannot reach Kubeflow Pipelines")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_custom_preset_file_reaches_the_pods_as_the_config_parameter(tmp_path):
    """`submit --preset mine.yaml`: the pods cannot read the submitter's file, so the resolved
    configuration travels as the ``config`` parameter, and the components load it in place of the
    preset (llmneo_components.params.load_run_config)."""
    from llmneo.config import load_config
    from llmneo_components.params import load_run_config

    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"distill": {"alpha": 0.3, "max_steps": 5}, "registry": {"uri": "s3://models/r"}}))
    fake = FakeKfp()
    kfp_client.submit(fake, "http://h", str(mine), ["distill.max_steps=4"])
    params = fake.runs[0]["params"]
    in_pod = load_run_config(params["preset"], params["overrides"], params["config"])
    assert in_pod == load_config(str(mine), ["distill.max_steps=4"])
    assert (in_pod.distill.alpha, in_pod.distill.max_steps) == (0.3, 4)


def test_no_cache_with_an_uploaded_version_is_refused():
    """Upstream rule (kfp SDK 2.17.3, kfp/client/client.py Client._create_job_config): enable_caching
    rewrites task caching options only ``if pipeline_package_path``; with a version id it is dropped."""
    fake = FakeKfp()
    kfp_client.upload(fake, version="0.1.0")
    fake.calls.clear()
    with pytest.raises(UserError, match=r"^--no-cache: KFP sets caching in the pipeline spec.*submit without --version"):
        kfp_client.submit(fake, "http://h", "tiny", [S3], version="0.1.0", enable_caching=False)
    assert fake.calls == []
    kfp_client.submit(fake, "http://h", "tiny", [S3], enable_caching=False)  # the local package: applied
    assert fake.runs[0]["enable_caching"] is False and fake.runs[0]["package"]


@pytest.mark.parametrize("tag, ok", [("2.14.3", False), ("2.5.0", False), ("1.8.5", False), ("2.15.0", True),
                                     ("v2.16.1", True), ("2.17.0-rc.1", True), ("unknown", True)])
def test_kfp_older_than_2_15_is_refused_before_upload_or_submit(tag, ok):
    """Upstream rule (kubeflow/pipelines: TaskConfig passthrough, commit a6f7fb6e84, first in release
    2.15.0; backend/src/apiserver/common/utils.go CustomMarshaler parses specs with DiscardUnknown=false,
    so an older API server rejects the spec). The version comes from healthz ``tag_name``
    (backend/src/apiserver/main.go healthzResponse), read raw: the SDK's model drops the field."""
    for action in (lambda f: kfp_client.upload(f, version="0.1.0"), lambda f: kfp_client.submit(f, "http://h", "tiny", [S3])):
        fake = FakeKfp(tag=tag)
        if ok:
            action(fake)
            assert fake.mutations()
        else:
            with pytest.raises(UserError, match=rf"^Kubeflow Pipelines {tag}: llmneo needs KFP >= 2.15"):
                action(fake)
            assert fake.mutations() == []


@pytest.mark.parametrize("style, ok", [("<2.15", False), ("2.15+", True), (None, True)])
def test_a_release_without_a_version_on_healthz_is_told_by_its_artifact_api(style, ok):
    """Upstream rule (kubeflow/pipelines release images set TAG_NAME only from 2.16, so healthz says
    "unknown" on 2.5–2.15; 2.15.0 moved ``GET /apis/v2beta1/runs/{run_id}/nodes/{node_id}/artifacts/
    {artifact_name}:read`` from RunService.ReadArtifact behind grpc-gateway, errors ``{code, message}``,
    to backend/src/apiserver/server/run_artifact_server.go RunArtifactServer.ReadArtifact, errors
    ``{error_message, error_details}`` from writeErrorToResponse). A server answering neither way passes."""
    fake = FakeKfp(tag="unknown", artifact_style=style)
    if ok:
        kfp_client.upload(fake, version="0.1.0")
        assert fake.mutations()
    else:
        with pytest.raises(UserError, match=r"^Kubeflow Pipelines unknown: its artifact API answers like KFP < 2.15; "
                                             r"llmneo needs KFP >= 2.15"):
            kfp_client.upload(fake, version="0.1.0")
        assert fake.mutations() == []
    assert ("get_artifact", kfp_client.ARTIFACT_PROBE, "GET") in fake.calls
    versioned = FakeKfp(tag="2.16.0", artifact_style="<2.15")
    kfp_client.check_server(versioned)  # a version on healthz: no probe
    assert not [c for c in versioned.calls if c[0] == "get_artifact"]


def test_client_sends_the_service_account_token_when_the_file_exists(tmp_path, monkeypatch):
    """Upstream rule (kfp SDK 2.17.3, kfp/client/client.py Client._load_config): with ``host`` set and
    neither ``existing_token`` nor ``credentials``, it returns before the in-cluster default
    credentials: no Authorization header, and multi-user KFP answers 401. connect() passes
    ServiceAccountTokenVolumeCredentials for the projected token (KF_PIPELINES_SA_TOKEN_PATH)."""
    import kfp
    from kfp.client import ServiceAccountTokenVolumeCredentials

    seen = {}

    class Recorder:
        def __init__(self, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(kfp, "Client", Recorder)
    token = tmp_path / "token"
    token.write_text("tok-1")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token))
    kfp_client.connect("http://ml-pipeline.kubeflow:8888", "team")
    creds = seen["credentials"]
    assert isinstance(creds, ServiceAccountTokenVolumeCredentials) and seen["host"] == "http://ml-pipeline.kubeflow:8888"
    assert creds._get_token() == "tok-1"
    token.write_text("tok-2")  # projected tokens rotate: read again on each refresh
    assert creds._get_token() == "tok-2"
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "absent"))
    kfp_client.connect("http://localhost:8888")
    assert seen["credentials"] is None  # single-user / port-forward without a token: nothing to send
    assert kfp_client.TOKEN_PATH == kfp.client.KF_PIPELINES_SA_TOKEN_PATH  # the path kfp and our CronJob use


@contextlib.contextmanager
def local_kfp(answer):
    """A local HTTP server in the place of the KFP API server: ``answer(path) -> (status, JSON)`` for
    each GET; yields (host URL, list of (path, Authorization header) seen)."""
    import http.server
    import threading

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append((self.path, self.headers.get("Authorization")))
            status, payload = answer(self.path)
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def healthz(tag):
    """backend/src/apiserver/main.go's healthz answer."""
    return {"commit_sha": "x", "tag_name": tag, "multi_user": True}


def test_the_real_client_sends_the_token_as_bearer(tmp_path, monkeypatch):
    """End to end through the real kfp.Client against a local HTTP server that records the headers
    (and answers healthz like backend/src/apiserver/main.go): every call carries the token, and the
    server version check reads its tag_name."""
    token = tmp_path / "token"
    token.write_text("tok-xyz")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token))
    with local_kfp(lambda path: (200, healthz("2.14.0"))) as (host, seen):
        client = kfp_client.connect(host)
        with pytest.raises(UserError, match=r"^Kubeflow Pipelines 2.14.0: llmneo needs KFP >= 2.15"):
            kfp_client.check_server(client)
    assert seen and all(auth == "Bearer tok-xyz" for _, auth in seen), seen
    assert {path for path, _ in seen} == {"/apis/v2beta1/healthz"}


@pytest.mark.parametrize("answer, refused", [({"code": 5, "message": "run not found", "details": []}, True),
                                            ({"error_message": "artifact not found: <nil>"}, False)])
def test_the_real_client_probes_the_artifact_api_of_an_unversioned_server(answer, refused):
    """The version probe through the real kfp.Client and kfp_server_api against a local HTTP server that
    answers like a KFP release image without TAG_NAME: healthz ``"unknown"``, and the artifact read of
    a made-up run with a 404 in the error format of KFP < 2.15 (grpc-gateway) or >= 2.15
    (run_artifact_server.go)."""
    def respond(path):
        return (200, healthz("unknown")) if path == "/apis/v2beta1/healthz" else (404, answer)

    with local_kfp(respond) as (host, seen):
        client = kfp_client.connect(host)
        if refused:
            with pytest.raises(UserError, match=r"^Kubeflow Pipelines unknown: its artifact API answers like KFP < 2.15"):
                kfp_client.check_server(client)
        else:
            assert kfp_client.check_server(client) == "unknown"
    # kfp.Client itself reads healthz when it connects; then check_server: healthz, then the probe
    assert [path for path, _ in seen[-2:]] == [
        "/apis/v2beta1/healthz", "/apis/v2beta1/runs/llmneo-version-probe/nodes/none/artifacts/none:read"]


def test_default_images_are_refused_unless_a_registry_is_given(monkeypatch, tmp_path):
    """Upstream rule (distribution/reference normalize.go ParseNormalizedNamed → splitDockerDomain, the
    name resolution of containerd and CRI-O): a reference whose first component has no "." or ":" and
    is not "localhost" is a Docker Hub repository, so ``llmneo/llmneo:0.1.0`` would be pulled from
    docker.io/llmneo — ImagePullBackOff at best, someone else's image at worst. upload, submit and
    schedule sync refuse the default names; --image-registry renames them, env values included."""
    from llmneo_components.images import DEFAULT_CPU_IMAGE, DEFAULT_IMAGE

    monkeypatch.delenv("LLMNEO_IMAGE_REGISTRY")
    fake = FakeKfp()
    refused = r"^pipeline llm_neo.yaml: runs image llmneo/llmneo-cpu:0.1.0, which would be pulled from Docker Hub"
    with pytest.raises(UserError, match=refused):
        kfp_client.upload(fake)
    with pytest.raises(UserError, match=refused):
        kfp_client.submit(fake, "http://kfp", "smollm2-demo", [S3])
    assert fake.mutations() == []
    # a version uploaded with the default names (by hand) is refused by submit and schedule sync too
    pipeline = fake.upload_pipeline(str(kfp_client.package_path()), pipeline_name="llm-neo")
    with pytest.raises(UserError, match=r"^pipeline version llm-neo: runs image llmneo/llmneo-cpu"):
        kfp_client.submit(fake, "http://kfp", "smollm2-demo", [S3], version="llm-neo")
    assert pipeline.pipeline_id and not fake.runs
    # with a registry: every default image renamed, nothing else in the package changed
    with kfp_client.registry_package(kfp_client.package_path(), "ghcr.io/team/") as path:
        renamed = list(yaml.safe_load_all(path.read_text()))
    original = list(yaml.safe_load_all(kfp_client.package_path().read_text()))
    images = kfp_client.spec_images(renamed[0])
    assert images == {"ghcr.io/team/llmneo:0.1.0", "ghcr.io/team/llmneo-cpu:0.1.0"}
    assert kfp_client.spec_images(original[0]) == {DEFAULT_IMAGE, DEFAULT_CPU_IMAGE}
    text = yaml.safe_dump_all(renamed, sort_keys=True)
    assert text.replace("ghcr.io/team/", "llmneo/") == yaml.safe_dump_all(original, sort_keys=True)
    assert "value: ghcr.io/team/llmneo:0.1.0" in text  # the TrainJob's image (LLMNEO_IMAGE of the launcher)
    with pytest.raises(UserError, match=r"^--image-registry: 'https://ghcr.io/x' is not a registry path"):
        with kfp_client.registry_package(kfp_client.package_path(), "https://ghcr.io/x"):
            pass
    proc = subprocess.run([sys.executable, "-m", "llmneo_pipelines.cli", "upload", "--host", "http://127.0.0.1:9"],
                          capture_output=True, text=True, env={**__import__("os").environ, "LLMNEO_IMAGE_REGISTRY": ""})
    assert proc.returncode == 2 and proc.stderr.startswith("error: pipeline llm_neo.yaml: runs image llmneo/")
