"""Optional second backend: mirror a registered version into a Kubeflow Model Registry.

The weights stay where llmneo put them (S3, or a folder); the Model Registry gets a registered
model / version / artifact that points there, with the lineage and metrics as custom properties, so
KServe and the Kubeflow UI can find it. On when ``registry.kubeflow_url`` is set. The client's
token comes from the standard places (``KF_PIPELINES_SA_TOKEN_PATH`` or the pod's service-account
token), never from llmneo configuration.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from llmneo.errors import UserError

LINEAGE_KEYS = ("pipeline_run_id", "git_commit", "config_hash", "dataset_hash", "teacher", "student",
                "method", "preset")


def model_uri(manifest_uri: str) -> str:
    """The URI to hand the Model Registry: S3 URIs get the endpoint/region query string that the
    Model Registry's ``s3_uri_from`` (and KServe) use for S3-compatible stores."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if manifest_uri.startswith("s3://") and endpoint:
        from model_registry.utils import s3_uri_from

        bucket, _, path = manifest_uri[5:].partition("/")
        return s3_uri_from(path, bucket, endpoint=endpoint,
                           region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1")
    return manifest_uri


def properties(manifest: dict) -> dict[str, str | float | int | bool]:
    """Flat custom properties (the Model Registry takes scalars only)."""
    lineage = manifest.get("lineage") or {}
    props: dict = {f"llmneo_{k}": str(lineage[k]) for k in LINEAGE_KEYS if lineage.get(k) is not None}
    props.update({f"metric_{k}": float(v) for k, v in (manifest.get("metrics") or {}).items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)})
    props["llmneo_content_digest"] = manifest["content_digest"]
    props["llmneo_registry_uri"] = manifest["uri"]
    return props


def mirror(settings, manifest: dict, client_factory: Callable | None = None) -> dict | None:
    """Register ``manifest``'s version in the Kubeflow Model Registry at ``settings.kubeflow_url``.

    Idempotent: a version that is already there is left alone. Returns what was recorded (or None
    when no Model Registry is configured). ``client_factory`` stands in for
    ``model_registry.ModelRegistry`` (tests pass a recording fake).
    """
    if not settings.kubeflow_url:
        return None
    if client_factory is None:
        from model_registry import ModelRegistry as client_factory
    url = settings.kubeflow_url
    try:
        client = client_factory(server_address=url, author=settings.kubeflow_author)
        name, version = manifest["name"], manifest["version"]
        if client.get_model_version(name, version) is not None:
            return {"url": url, "name": name, "version": version, "created": False}
        uri = model_uri(manifest["uri"])
        client.register_model(name, uri, version=version, model_format_name="safetensors",
                              model_format_version="1", author=settings.kubeflow_author,
                              version_description=f"llmneo {manifest.get('lineage', {}).get('method') or ''} "
                                                  f"distilled model, {len(manifest['files'])} files",
                              metadata=properties(manifest))
    except UserError:
        raise
    except Exception as e:  # the client raises its own StoreError/ApiException/connection errors
        raise UserError(f"registry.kubeflow_url {url}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return {"url": url, "name": name, "version": version, "uri": uri, "created": True}
