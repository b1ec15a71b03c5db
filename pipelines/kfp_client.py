"""Kubeflow Pipelines from the command line: upload the compiled DAG, submit runs.

    llmneo upload --host URL [--version NAME] [--description TEXT]
    llmneo submit --host URL --preset llama3.1-8b_to_3.2-1b --pool-file k8s/overlays/gke-a100/pool.yaml \\
        [--param distill_nodes=2] [key=value ...]

``--host`` defaults to ``$KFP_HOST`` and ``--namespace`` to ``$KFP_NAMESPACE`` (multi-user Kubeflow:
the profile namespace). Authentication (multi-user KFP answers 401 "no user identity header"
without it): when the service-account token file exists — ``$KF_PIPELINES_SA_TOKEN_PATH``, default
``/var/run/secrets/kubeflow/pipelines/token``, a projected token with audience
``pipelines.kubeflow.org`` — every call sends it. kfp.Client given a ``host`` never does that by
itself (its in-cluster default credentials apply only without a host). From a laptop through a
port-forward, write a token to a file and point the variable at it::

    kubectl -n NS create token default-editor --audience=pipelines.kubeflow.org > /tmp/kfp-token
    KF_PIPELINES_SA_TOKEN_PATH=/tmp/kfp-token llmneo submit --host http://localhost:8888 ...

Everything is checked locally first (configuration, pipeline parameter names and types): a
mistake is one ``error:`` line and nothing is created. Before uploading or submitting, the API
server's version (``/apis/v2beta1/healthz``) must be at least :data:`MIN_KFP` (the TaskConfig
passthrough of the multi-node branch; older servers reject the pipeline spec).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import warnings
from importlib import resources
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import yaml

from llmneo.config import dump_yaml, load_config
from llmneo.errors import UserError
from llmneo.preflight import preflight

PIPELINE_NAME = "llm-neo"  # = pipelines/llm_neo.py PIPELINE_NAME (a test checks)
DEFAULT_EXPERIMENT = "llmneo"
DEFAULT_SERVICE_ACCOUNT = "llmneo-pipeline"  # k8s/base/serviceaccounts.yaml
# KFP 2.15.0 is the first release with TaskConfig passthrough (kubeflow/pipelines a6f7fb6e84,
# api/v2alpha1/pipeline_spec.proto task_config_passthroughs); the API server parses pipeline specs
# with DiscardUnknown=false (backend/src/apiserver/common/utils.go CustomMarshaler), so an older
# server rejects our spec.
MIN_KFP = (2, 15)
TOKEN_ENV, TOKEN_PATH = "KF_PIPELINES_SA_TOKEN_PATH", "/var/run/secrets/kubeflow/pipelines/token"  # = kfp.client's
CONFIG_PARAM = "config"  # the resolved configuration, as YAML (llmneo_components.params)
# The register step's registry (pipelines/llm_neo.py): a pod has no lasting file system of its own, so a
# run needs an s3:// registry (the register step itself refuses a folder on no mounted volume).
REGISTRY_PARAM = "registry_uri"
PARAM_TYPES = {"STRING": str, "NUMBER_INTEGER": int, "NUMBER_DOUBLE": (int, float), "BOOLEAN": bool,
               "LIST": list, "STRUCT": dict}


def package_path() -> Path:
    """The compiled pipeline shipped with the package (pipelines/llm_neo.yaml)."""
    return Path(str(resources.files("llmneo_pipelines").joinpath("llm_neo.yaml")))


def pipeline_spec(package: str | Path | None = None) -> dict:
    return next(yaml.safe_load_all(Path(package or package_path()).read_text()))


def package_version(package: str | Path | None = None) -> str:
    """Default version name: the package version and the compiled YAML's content hash, so that
    re-uploading the same pipeline is a no-op and a changed one gets a new version."""
    digest = hashlib.sha256(Path(package or package_path()).read_bytes()).hexdigest()[:10]
    return f"{installed_version('llmneo')}-{digest}"


# --------------------------------------------------------------------------------------------
# Images: never the default names, which would be pulled from Docker Hub
# --------------------------------------------------------------------------------------------


def _executor_containers(spec: dict) -> list[dict]:
    return [ex["container"] for ex in ((spec or {}).get("deploymentSpec") or {}).get("executors", {}).values()
            if "container" in ex]


def spec_images(spec: dict) -> set[str]:
    """Every image a pipeline spec runs: the executors' images and image-valued env (``LLMNEO_IMAGE``
    of the multi-node launcher, the TrainJob's image)."""
    from llmneo_components.images import DEFAULT_IMAGES

    found = set()
    for container in _executor_containers(spec):
        found.add(container.get("image", ""))
        found |= {e.get("value") for e in container.get("env", []) if e.get("value") in DEFAULT_IMAGES}
    return found - {""}


def check_images(spec: dict, where: str) -> None:
    """Refuse a pipeline spec that runs a default image. Upstream rule (distribution/reference
    normalize.go ParseNormalizedNamed/splitDockerDomain, which containerd and CRI-O apply): a name whose
    first component has no ``.`` or ``:`` and is not ``localhost`` is a Docker Hub repository, so
    ``llmneo/llmneo:0.1.0`` is ``docker.io/llmneo/llmneo:0.1.0`` — not an image this project publishes."""
    from llmneo_components.images import DEFAULT_IMAGES, REGISTRY_ENV

    default = sorted(spec_images(spec) & set(DEFAULT_IMAGES))
    if default:
        image = default[0]
        raise UserError(f"{where}: runs image {image}, which would be pulled from Docker Hub (docker.io/{image}), "
                        f"not from your registry: push the images there (make images) and pass --image-registry "
                        f"REGISTRY (or set {REGISTRY_ENV}), or compile with LLMNEO_IMAGE/LLMNEO_CPU_IMAGE set "
                        f"(make pipeline)")


@contextlib.contextmanager
def registry_package(package: str | Path, registry: str | None):
    """``package``, or with ``registry`` a temporary copy whose default images are renamed into it
    (:func:`llmneo_components.images.in_registry`)."""
    import tempfile

    from llmneo_components.images import REGISTRY_ENV, in_registry

    registry = registry or os.environ.get(REGISTRY_ENV)
    if not registry:
        yield Path(package)
        return
    if "://" in registry or not registry.strip("/ ") or any(c.isspace() for c in registry):
        raise UserError(f"--image-registry: {registry!r} is not a registry path such as ghcr.io/team")
    docs = list(yaml.safe_load_all(Path(package).read_text()))
    for container in _executor_containers(docs[0]):
        container["image"] = in_registry(container.get("image", ""), registry)
        for env in container.get("env", []):
            if "value" in env:
                env["value"] = in_registry(env["value"], registry)
    with tempfile.TemporaryDirectory(prefix="llmneo-package-") as tmp:
        path = Path(tmp) / Path(package).name
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        yield path


# --------------------------------------------------------------------------------------------
# Run parameters: configuration validated locally, pool file, --param overrides
# --------------------------------------------------------------------------------------------


def parse_params(items: list[str]) -> dict[str, Any]:
    """``["distill_nodes=2", 'gpu_node_selector={"pool": "a100"}']`` → values parsed as YAML."""
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--param {item!r}: expected name=value, e.g. distill_nodes=2")
        name, raw = item.split("=", 1)
        try:
            out[name.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise UserError(f"--param {name}: value is not valid YAML/JSON") from None
    return out


def read_pool(pool_file: str | Path | None) -> dict[str, Any]:
    if not pool_file:
        return {}
    path = Path(pool_file)
    if not path.is_file():
        raise UserError(f"--pool-file: {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a pool file is a mapping of pipeline parameters")
    return data


def run_parameters(preset: str, overrides: list[str], pool: dict | None = None, params: dict | None = None,
                   package: str | Path | None = None, where: str = "") -> dict[str, Any]:
    """The pipeline arguments of one run: the configuration (validated here, so a typo fails now and
    not an hour into the run, and sent resolved as ``config``, so a local preset file reaches the
    pods), the pool's parameters, then explicit ones. ``where`` prefixes errors. A whole number for
    a STRING parameter (``distill_gpus: 6``) is sent as text, the type the pipeline declares. The
    registry (``registry_uri`` or else ``registry.uri``) must be an s3:// URI."""
    prefix = f"{where}: " if where else ""
    try:
        cfg = load_config(preset, overrides)
        preflight(cfg, local=False)  # local paths are the pods' paths: only URIs are checked from here
    except UserError as e:
        raise UserError(f"{prefix}{e}") from None
    declared = pipeline_spec(package)["root"]["inputDefinitions"]["parameters"]
    args: dict[str, Any] = {"preset": preset, "overrides": list(overrides),
                            "max_kl_to_teacher": cfg.eval.max_kl_to_teacher}
    if CONFIG_PARAM in declared:
        args[CONFIG_PARAM] = dump_yaml(cfg)
    for source, values in (("pool file", pool or {}), ("parameter", params or {})):
        for name, value in values.items():
            if name not in declared:
                raise UserError(f"{prefix}{source} {name}: not a pipeline parameter; known: {', '.join(sorted(declared))}")
            if name in ("preset", "overrides", CONFIG_PARAM):
                raise UserError(f"{prefix}{source} {name}: use --preset / key=value overrides")
            want = PARAM_TYPES[declared[name]["parameterType"]]
            if want is str and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise UserError(f"{prefix}{source} {name}: expected {declared[name]['parameterType'].lower()}, got {value!r}")
            args[name] = value
    nodes = args.get("distill_nodes", declared.get("distill_nodes", {}).get("defaultValue", 1))
    if nodes > 1 and not cfg.cluster.staging_uri.startswith("s3://"):
        raise UserError(f"{prefix}cluster.staging_uri: set an s3:// prefix for distill_nodes={nodes} "
                        f"(the TrainJob's nodes exchange inputs and the adapter there)")
    registry = args.get(REGISTRY_PARAM) or cfg.registry.uri
    if not registry.startswith("s3://"):
        raise UserError(f"{prefix}registry.uri: {registry!r} would be a folder inside the register step's pod, "
                        f"lost when the pod ends: set registry.uri=s3://BUCKET/PREFIX or "
                        f"--param {REGISTRY_PARAM}=s3://BUCKET/PREFIX")
    return args


# --------------------------------------------------------------------------------------------
# KFP client calls
# --------------------------------------------------------------------------------------------


def token_credentials(path: str | None = None):
    """kfp's ServiceAccountTokenVolumeCredentials when the token file exists (``path``, else
    ``$KF_PIPELINES_SA_TOKEN_PATH``, else kfp's default path), else None.

    Upstream rule (kfp SDK 2.17, kfp/client/client.py Client._load_config): with ``host`` set and no
    ``existing_token``/``credentials``, the client returns before its in-cluster default credentials,
    so no token is sent and multi-user KFP answers 401; the credentials must be passed explicitly.
    The token is re-read before each call (projected tokens rotate)."""
    path = path or os.environ.get(TOKEN_ENV) or TOKEN_PATH
    if not Path(path).is_file():
        return None
    from kfp.client import ServiceAccountTokenVolumeCredentials

    return ServiceAccountTokenVolumeCredentials(path=path)


def connect(host: str | None, namespace: str | None = None, token_path: str | None = None):
    """A kfp.Client for ``host`` (or ``$KFP_HOST``), authenticated by the service-account token
    file when there is one (:func:`token_credentials`)."""
    host = host or os.environ.get("KFP_HOST")
    if not host:
        raise UserError("--host: the Kubeflow Pipelines URL is required (or set KFP_HOST)")
    import kfp  # the KFP client is only needed when talking to a server

    credentials = token_credentials(token_path)
    with _api_errors(f"connect to {host}"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "This client only works with Kubeflow Pipeline v2", FutureWarning)
        return kfp.Client(host=host, namespace=namespace or os.environ.get("KFP_NAMESPACE") or None,
                          credentials=credentials)


def parse_version(text: str) -> tuple[int, ...] | None:
    """``"2.15.0"``, ``"v2.15.0-rc.1"`` → (2, 15, 0); None when it is no version (dev builds: "unknown")."""
    import re

    m = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", str(text or "").strip())
    return tuple(int(g) for g in m.groups() if g is not None) if m else None


def server_version(client) -> str:
    """The KFP API server's ``tag_name`` from ``/apis/v2beta1/healthz`` (backend/src/apiserver/main.go
    healthzResponse). kfp_server_api's response model has no such field, so the raw JSON is read."""
    resp = client._healthz_api.healthz_service_get_healthz(_preload_content=False)
    try:
        return str(json.loads(resp.data or b"{}").get("tag_name") or "")
    except (ValueError, AttributeError):
        return ""


# Read an artifact of a run that does not exist: KFP >= 2.15 serves this route with its own HTTP handler
# (backend/src/apiserver/server/run_artifact_server.go RunArtifactServer.ReadArtifact, added in 2.15.0 by
# "Implemented HTTP Artifact Streaming", #12394), whose errors are ``{"error_message", "error_details"}``
# (writeErrorToResponse → api.Error); up to 2.14 the route is RunService.ReadArtifact behind grpc-gateway,
# whose errors are a gRPC status ``{"code", "message", "details"}``.
ARTIFACT_PROBE = "/apis/v2beta1/runs/{run_id}/nodes/{node_id}/artifacts/{artifact_name}:read"


def artifact_api_style(client) -> str | None:
    """``"2.15+"`` or ``"<2.15"`` from how the API server answers :data:`ARTIFACT_PROBE` for a made-up
    run; None when the answer says neither (a proxy in between, no such route)."""
    from kfp_server_api.exceptions import ApiException

    names = {"run_id": "llmneo-version-probe", "node_id": "none", "artifact_name": "none"}
    try:
        client._healthz_api.api_client.call_api(
            ARTIFACT_PROBE, "GET", path_params=names, header_params={"Accept": "application/json"},
            auth_settings=["Bearer"], _return_http_data_only=True)
        return None  # a made-up run has no artifact: an answer without an error says nothing
    except ApiException as e:
        try:
            body = json.loads(e.body or "{}")
        except (ValueError, TypeError):
            return None
    if not isinstance(body, dict):
        return None
    if "error_message" in body:
        return "2.15+"
    if "code" in body and "message" in body:
        return "<2.15"
    return None


def check_server(client) -> str:
    """Refuse a KFP API server older than :data:`MIN_KFP`. The version is healthz ``tag_name``; release
    images up to 2.15 report "unknown" there (upstream sets TAG_NAME in its images only from 2.16), so
    then the artifact API's error format tells (:func:`artifact_api_style`); a server that answers
    neither way passes."""
    need = ".".join(map(str, MIN_KFP))
    why = f"llmneo needs KFP >= {need} (TaskConfig passthrough in the pipeline spec; Kubeflow >= 1.11 ships it)"
    with _api_errors("Kubeflow Pipelines healthz"):
        tag = server_version(client)
    found = parse_version(tag)
    if found is not None and found[:2] < MIN_KFP:
        raise UserError(f"Kubeflow Pipelines {tag}: {why}")
    if found is None:
        with _api_errors("Kubeflow Pipelines version probe"):
            style = artifact_api_style(client)
        if style == "<2.15":
            raise UserError(f"Kubeflow Pipelines {tag or '(no version on healthz)'}: its artifact API answers like "
                            f"KFP < 2.15; {why}")
    return tag


def check_caching(version: str | None, enable_caching: bool | None) -> None:
    """``enable_caching`` applies only to the local package: the SDK rewrites the caching options of a
    package's tasks (kfp 2.17, kfp/client/client.py Client._create_job_config: only ``if
    pipeline_package_path``) and leaves an uploaded version's spec alone, so it is refused, not ignored."""
    if version and enable_caching is not None:
        raise UserError("--no-cache: KFP sets caching in the pipeline spec, and an uploaded version's spec is fixed: "
                        "submit without --version (the local package, caching off) or upload a version compiled "
                        "with caching off")


@contextlib.contextmanager
def _api_errors(what: str):
    """KFP API and connection failures as one line (the server's message, not a traceback)."""
    import urllib3
    from kfp_server_api.exceptions import ApiException

    try:
        yield
    except ApiException as e:
        message = ""
        try:
            body = json.loads(e.body or "{}")
            message = body.get("message") or body.get("error") or ""
        except (ValueError, AttributeError):
            message = str(e.body or "")[:200]
        raise UserError(f"{what}: HTTP {e.status} {message or e.reason}".rstrip()) from None
    except (OSError, urllib3.exceptions.HTTPError) as e:
        raise UserError(f"{what}: cannot reach Kubeflow Pipelines ({type(e).__name__}: {str(e)[:160]})") from None


def all_pages(call, attr: str, **kwargs) -> list:
    """Every item of a paginated KFP list call."""
    items, token = [], ""
    while True:
        resp = call(page_token=token, page_size=100, **kwargs)
        items += getattr(resp, attr, None) or []
        token = getattr(resp, "next_page_token", None) or ""
        if not token:
            return items


def find_version(client, pipeline_id: str, name: str | None):
    """The pipeline version called ``name`` (None or "latest": the newest), or None."""
    versions = all_pages(client.list_pipeline_versions, "pipeline_versions", pipeline_id=pipeline_id)
    if not name or name == "latest":
        return max(versions, key=lambda v: str(v.created_at), default=None)
    return next((v for v in versions if v.display_name == name), None)


def resolve_version(client, version: str | None, pipeline: str = PIPELINE_NAME) -> tuple[str, Any]:
    """(pipeline id, version) of an uploaded pipeline version, or a one-line error naming it."""
    with _api_errors(f"pipeline {pipeline}"):
        pipeline_id = client.get_pipeline_id(pipeline)
        if pipeline_id is None:
            raise UserError(f"pipeline {pipeline!r} is not uploaded: run `llmneo upload` first")
        found = find_version(client, pipeline_id, version)
    if found is None:
        raise UserError(f"pipeline {pipeline}: no version {version or 'at all'}: run `llmneo upload"
                        f"{' --version ' + version if version and version != 'latest' else ''}`")
    return pipeline_id, found


def check_version_images(found) -> None:
    """:func:`check_images` on an uploaded version's spec (the API returns it with the version)."""
    spec = getattr(found, "pipeline_spec", None)
    if isinstance(spec, dict):
        check_images(spec.get("pipeline_spec", spec), f"pipeline version {found.display_name}")


def upload(client, version: str | None = None, description: str | None = None,
           package: str | Path | None = None, pipeline: str = PIPELINE_NAME, image_registry: str | None = None) -> dict:
    """Upload the compiled pipeline as ``pipeline``/``version`` (created on first use). The same
    version name twice is a no-op when the content matches (default names are content hashes).
    ``image_registry``: where the default images are (:func:`registry_package`); the default names
    themselves are refused (:func:`check_images`)."""
    with registry_package(package or package_path(), image_registry) as path:
        return _upload(client, version, description, path, pipeline)


def _upload(client, version: str | None, description: str | None, package: Path, pipeline: str) -> dict:
    check_images(pipeline_spec(package), f"pipeline {package.name}")
    version = version or package_version(package)
    spec = pipeline_spec(package)
    check_server(client)
    pipeline_description = spec["pipelineInfo"].get("description") or "llmneo"
    description = description or f"llmneo {version}: {pipeline_description}"
    with _api_errors(f"upload {pipeline} {version}"):
        pipeline_id = client.get_pipeline_id(pipeline)
        if pipeline_id is None:
            # not client.upload_pipeline: the upload endpoint also creates a first version named after the
            # pipeline (backend/src/apiserver/server/pipeline_upload_server.go uploadPipeline); CreatePipeline
            # (pipeline_server.go) creates the pipeline alone, and our named version follows.
            import kfp_server_api

            created = client._pipelines_api.pipeline_service_create_pipeline(
                pipeline=kfp_server_api.V2beta1Pipeline(display_name=pipeline, description=pipeline_description))
            pipeline_id = created.pipeline_id
        existing = find_version(client, pipeline_id, version)
        if existing is not None:
            return {"pipeline_id": pipeline_id, "version_id": existing.pipeline_version_id, "version": version,
                    "created": False}
        made = client.upload_pipeline_version(str(package), pipeline_version_name=version, pipeline_id=pipeline_id,
                                              description=description)
    return {"pipeline_id": pipeline_id, "version_id": made.pipeline_version_id, "version": version, "created": True}


def run_url(host: str, run_id: str) -> str:
    return f"{host.rstrip('/')}/#/runs/details/{run_id}"


def submit(client, host: str, preset: str, overrides: list[str], pool: dict | None = None,
           params: dict | None = None, experiment: str = DEFAULT_EXPERIMENT, version: str | None = None,
           run_name: str | None = None, service_account: str | None = DEFAULT_SERVICE_ACCOUNT,
           enable_caching: bool | None = None, namespace: str | None = None, image_registry: str | None = None,
           package: str | Path | None = None, pipeline: str = PIPELINE_NAME) -> dict:
    """Create one run (of the local compiled ``package``, default the packaged llm-neo, or of an uploaded
    ``version`` of ``pipeline``); returns its id and URL. ``enable_caching`` only with the local
    package (:func:`check_caching`); ``image_registry`` as for :func:`upload` (an uploaded version
    keeps the images it was uploaded with)."""

    check_caching(version, enable_caching)
    args = run_parameters(preset, overrides, pool, params, package=package)
    name = run_name or f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_server(client)
    with _api_errors(f"submit to {host}"):
        exp = client.create_experiment(experiment, namespace=namespace)
        kwargs = dict(experiment_id=exp.experiment_id, job_name=name, params=args, enable_caching=enable_caching,
                      service_account=service_account or None)
        if version:
            pipeline_id, found = resolve_version(client, version, pipeline)
            check_version_images(found)
            run = client.run_pipeline(pipeline_id=pipeline_id, version_id=found.pipeline_version_id, **kwargs)
        else:
            with registry_package(package or package_path(), image_registry) as sent:
                check_images(pipeline_spec(sent), f"pipeline {sent.name}")
                run = client.run_pipeline(pipeline_package_path=str(sent), **kwargs)
    return {"run_id": run.run_id, "name": name, "url": run_url(host, run.run_id), "parameters": args}


# --------------------------------------------------------------------------------------------
# CLI entry points (the subcommands of pipelines/cli.py)
# --------------------------------------------------------------------------------------------


def check_package_images(package: str | Path | None, registry: str | None) -> None:
    """:func:`check_images` of the package as it would be sent: before connecting to anything."""
    with registry_package(package or package_path(), registry) as path:
        check_images(pipeline_spec(path), f"pipeline {path.name}")


def cmd_upload(args) -> int:
    host = args.host or os.environ.get("KFP_HOST", "")
    sweep = getattr(args, "sweep", False)
    pipeline = SWEEP_PIPELINE if sweep else PIPELINE_NAME
    package = args.package or (_packaged_sweep() if sweep else None)
    check_package_images(package, args.image_registry)
    result = upload(connect(host, args.namespace), args.version, args.description, package, pipeline=pipeline,
                    image_registry=args.image_registry)
    verb = "uploaded" if result["created"] else "already uploaded"
    print(f"{verb} {pipeline} version {result['version']} (pipeline {result['pipeline_id']}, "
          f"version {result['version_id']})")
    print(f"{host.rstrip('/')}/#/pipelines/details/{result['pipeline_id']}/version/{result['version_id']}")
    return 0


SWEEP_PIPELINE = "llm-neo-sweep"  # = pipelines/llm_neo_sweep.py PIPELINE_NAME


def sweep_package(preset: str, overrides: list[str], grid: list[str], metrics: list[str], params: dict,
                  parallelism: int | None, folder: str | Path) -> Path:
    """``llmneo submit --sweep``: the grid checked here (every point's configuration), ``grid`` and
    ``metrics`` set as pipeline parameters in ``params``, and the sweep pipeline compiled into
    ``folder`` with ``parallelism`` (a compile-time setting of KFP's ParallelFor)."""
    from llmneo.sweep import parse_metric, plan_points
    from llmneo_pipelines.llm_neo_sweep import PARALLELISM, compile_pipeline

    if not grid:
        raise UserError("--sweep: give the swept settings with --grid KEY=V1,V2 (repeatable)")
    plan_points(list(overrides), list(grid), lambda point: load_config(preset, point))
    for m in metrics:
        parse_metric(m)
    if parallelism is not None and parallelism < 0:
        raise UserError(f"--parallelism: expected 0 (no limit) or more points at once, got {parallelism}")
    params.update(grid=list(grid), **({"metrics": list(metrics)} if metrics else {}))
    path = Path(folder) / "llm_neo_sweep.yaml"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compile_pipeline(str(path), PARALLELISM if parallelism is None else parallelism)
    return path


def cmd_submit(args) -> int:
    if getattr(args, "sweep", False):
        return _cmd_submit_sweep(args)
    if getattr(args, "grid", None):
        raise UserError("--grid: add --sweep to run the sweep pipeline")
    host = args.host or os.environ.get("KFP_HOST", "")
    pool, params = read_pool(args.pool_file), parse_params(args.param)
    run_parameters(args.preset, args.overrides, pool, params)  # validate before connecting
    check_caching(args.version, False if args.no_cache else None)
    if not args.version:
        check_package_images(None, args.image_registry)
    result = submit(connect(host, args.namespace), host, args.preset, args.overrides, pool, params,
                    experiment=args.experiment, version=args.version, run_name=args.run_name,
                    service_account=args.service_account, enable_caching=False if args.no_cache else None,
                    namespace=args.namespace or os.environ.get("KFP_NAMESPACE") or None,
                    image_registry=args.image_registry)
    print(f"run {result['name']} ({result['run_id']}): {result['url']}")
    return 0


def _cmd_submit_sweep(args) -> int:
    import tempfile

    host = args.host or os.environ.get("KFP_HOST", "")
    pool, params = read_pool(args.pool_file), parse_params(args.param)
    with tempfile.TemporaryDirectory(prefix="llmneo-sweep-") as folder:
        package = None if args.version else sweep_package(args.preset, args.overrides, args.grid, args.metric,
                                                          params, args.parallelism, folder)
        if args.version:
            params.update(grid=list(args.grid), **({"metrics": list(args.metric)} if args.metric else {}))
        else:
            check_package_images(package, args.image_registry)
        check_caching(args.version, False if args.no_cache else None)
        result = submit(connect(host, args.namespace), host, args.preset, args.overrides, pool, params,
                        experiment=args.experiment, version=args.version, run_name=args.run_name,
                        service_account=args.service_account, enable_caching=False if args.no_cache else None,
                        namespace=args.namespace or os.environ.get("KFP_NAMESPACE") or None,
                        image_registry=args.image_registry, package=package or _packaged_sweep(),
                        pipeline=SWEEP_PIPELINE)
    print(f"sweep run {result['name']} ({result['run_id']}): {result['url']}")
    return 0


def _packaged_sweep() -> Path:
    """The compiled sweep pipeline shipped with the package (pipelines/llm_neo_sweep.yaml)."""
    return Path(str(resources.files("llmneo_pipelines").joinpath("llm_neo_sweep.yaml")))
