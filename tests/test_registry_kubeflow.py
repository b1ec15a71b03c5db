"""The optional Kubeflow Model Registry backend, checked at the call level: no Model Registry server
runs here, so a recording fake takes the place of ``model_registry.ModelRegistry`` (same
constructor and method signatures as model-registry 0.3.18)."""

import inspect

import pytest

from llmneo.errors import UserError
from llmneo.registry.kubeflow import mirror


class RecordingModelRegistry:
    """Records constructor and method calls; remembers registered versions like the server would."""

    calls: list = []
    versions: set = set()
    fail_with: Exception | None = None

    def __init__(self, server_address, port=None, *, author, **kwargs):
        if self.fail_with:
            raise self.fail_with
        self.calls.append(("init", {"server_address": server_address, "author": author, **kwargs}))

    def get_model_version(self, name, version):
        self.calls.append(("get_model_version", {"name": name, "version": version}))
        return object() if (name, version) in self.versions else None

    def register_model(self, name, uri, *, model_format_name, model_format_version, version, **kwargs):
        self.calls.append(("register_model", {"name": name, "uri": uri, "version": version,
                                              "model_format_name": model_format_name, **kwargs}))
        self.versions.add((name, version))
        return object()


@pytest.fixture
def fake(monkeypatch):
    import model_registry

    RecordingModelRegistry.calls, RecordingModelRegistry.versions = [], set()
    RecordingModelRegistry.fail_with = None
    monkeypatch.setattr(model_registry, "ModelRegistry", RecordingModelRegistry)
    return RecordingModelRegistry


def test_fake_matches_the_real_client_signatures():
    from model_registry import ModelRegistry

    for method in ("__init__", "get_model_version", "register_model"):
        real = inspect.signature(getattr(ModelRegistry, method)).parameters
        ours = inspect.signature(getattr(RecordingModelRegistry, method)).parameters
        required = [p for p, v in ours.items() if v.default is inspect.Parameter.empty and v.kind != v.VAR_KEYWORD]
        assert set(required) <= set(real), method


MANIFEST = {"name": "smollm2-neo", "version": "v3", "uri": "s3://models/llmneo/smollm2-neo/v3",
            "content_digest": "d" * 64, "files": [{"path": "model.safetensors", "sha256": "x", "size": 1}],
            "lineage": {"pipeline_run_id": "run-7", "git_commit": "c0ffee", "config_hash": "cfg", "dataset_hash": "ds",
                        "teacher": "smollm2", "student": "prune", "method": "neo", "config": {"nested": 1}},
            "metrics": {"kl_to_teacher": 0.12, "llmneo_mc/acc": 0.4}}


class Settings:
    kubeflow_url = "https://model-registry.kubeflow.svc:8443"
    kubeflow_author = "pipelines"


def test_registers_the_s3_uri_and_metadata(fake, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://seaweedfs.storage:8333")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    out = mirror(Settings(), MANIFEST)
    (init, _get, register) = fake.calls
    assert init == ("init", {"server_address": Settings.kubeflow_url, "author": "pipelines"})
    kind, call = register
    assert kind == "register_model" and (call["name"], call["version"]) == ("smollm2-neo", "v3")
    # the S3-compatible endpoint travels with the URI, in the form model_registry.utils.s3_uri_from makes
    assert call["uri"].startswith("s3://models/llmneo/smollm2-neo/v3?")
    assert "endpoint=http" in call["uri"] and "defaultRegion=eu-west-1" in call["uri"]
    assert call["model_format_name"] == "safetensors"
    meta = call["metadata"]
    assert meta["llmneo_pipeline_run_id"] == "run-7" and meta["llmneo_git_commit"] == "c0ffee"
    assert meta["llmneo_teacher"] == "smollm2" and meta["metric_kl_to_teacher"] == 0.12
    assert meta["llmneo_registry_uri"] == MANIFEST["uri"]
    assert all(isinstance(v, (str, int, float, bool)) for v in meta.values())  # the server takes scalars only
    assert out["created"] is True


def test_idempotent_and_off_by_default(fake):
    mirror(Settings(), MANIFEST)
    again = mirror(Settings(), MANIFEST)
    assert again["created"] is False
    assert [c[0] for c in fake.calls].count("register_model") == 1

    class Off:
        kubeflow_url = ""

    assert mirror(Off(), MANIFEST) is None


def test_client_failures_are_one_line_errors(fake):
    fake.fail_with = ConnectionError("connection refused\nlong detail")
    with pytest.raises(UserError, match=r"^registry.kubeflow_url https://model-registry.*: ConnectionError: connection refused$"):
        mirror(Settings(), MANIFEST)


def test_register_step_mirrors_when_configured(fake, tmp_path):
    from llmneo.cards import EvalCard, weight_digests
    from llmneo.config import load_config
    from llmneo.steps import register_model

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"w")
    EvalCard(metrics={"kl_to_teacher": 0.2}, teacher="tiny", student="tiny", method="neo", dataset_hash="ds",
             gate={"passed": True, "reasons": []}, weights=weight_digests(model)).write(model)
    cfg = load_config("tiny", [f"registry.uri={tmp_path / 'reg'}", f"registry.kubeflow_url={Settings.kubeflow_url}"])
    manifest = register_model(cfg, model, "run-42")
    assert manifest["kubeflow_model_registry"]["version"] == "v1"
    (_, call) = [c for c in fake.calls if c[0] == "register_model"][0]
    assert call["uri"] == str((tmp_path / "reg" / "tiny-neo" / "v1").resolve())
    assert call["metadata"]["llmneo_pipeline_run_id"] == "run-42"
