"""A recording fake of kfp.Client (no KFP backend runs here): the methods llmneo calls, with the
real kfp_server_api response models, small pages (so pagination is exercised) and the same
argument checks the server makes (parameters must be declared by the pipeline)."""

from __future__ import annotations

import datetime
import itertools
import json
from pathlib import Path

import kfp_server_api as api
import yaml


class _Raw:
    """What an API call with ``_preload_content=False`` returns: the raw body."""

    def __init__(self, payload: dict):
        self.data = json.dumps(payload).encode()


class _ApiClient:
    """kfp_server_api.ApiClient.call_api for the version probe (pipelines/kfp_client.py ARTIFACT_PROBE):
    answers a made-up run's artifact read with the error format of the server's version."""

    def __init__(self, fake):
        self.fake = fake

    def call_api(self, resource_path, method, path_params=None, **kwargs):
        self.fake.calls.append(("get_artifact", resource_path, method))
        if self.fake.artifact_style is None:
            raise api.exceptions.ApiException(status=404, reason="Not Found")  # a proxy's plain 404
        if self.fake.artifact_style == "2.15+":  # run_artifact_server.go writeErrorToResponse → api.Error
            body = {"error_message": "artifact not found: <nil>", "error_details": "artifact not found: <nil>"}
        else:  # grpc-gateway's gRPC status of RunService.ReadArtifact
            body = {"code": 5, "message": "failed to read artifact: run not found", "details": []}
        raise _error(404, body)


def _error(status, body):
    e = api.exceptions.ApiException(status=status, reason="Not Found")
    e.body = json.dumps(body).encode()
    return e


class _HealthzApi:
    def __init__(self, fake):
        self.fake = fake
        self.api_client = _ApiClient(fake)

    def healthz_service_get_healthz(self, _preload_content=True):
        # backend/src/apiserver/main.go healthzResponse: commit_sha, tag_name, multi_user, pipeline_store
        self.fake.calls.append(("get_healthz",))
        payload = {"commit_sha": "abc", "tag_name": self.fake.tag, "multi_user": True}
        return _Raw(payload) if not _preload_content else api.V2beta1GetHealthzResponse(multi_user=True)


class _PipelinesApi:
    def __init__(self, fake):
        self.fake = fake

    def pipeline_service_create_pipeline(self, pipeline):
        """CreatePipeline (backend/src/apiserver/server/pipeline_server.go): the pipeline, no version."""
        self.fake.calls.append(("create_pipeline", pipeline.display_name, pipeline.description))
        p = api.V2beta1Pipeline(pipeline_id=next(self.fake._ids), display_name=pipeline.display_name,
                                description=pipeline.description)
        self.fake.pipelines[p.display_name] = p
        self.fake.versions[p.pipeline_id] = []
        return p


class FakeKfp:
    PAGE = 2

    def __init__(self, tag: str = "2.16.0", artifact_style: str | None = "2.15+"):
        self.tag = tag  # the API server's version (healthz tag_name)
        self.artifact_style = artifact_style  # how its artifact API answers errors: "2.15+", "<2.15", None
        self._healthz_api = _HealthzApi(self)
        self._pipelines_api = _PipelinesApi(self)
        self.calls: list[tuple] = []
        self.pipelines: dict[str, api.V2beta1Pipeline] = {}
        self.versions: dict[str, list[api.V2beta1PipelineVersion]] = {}
        self.recurring: dict[str, api.V2beta1RecurringRun] = {}
        self.runs: list[dict] = []
        self._ids = (f"id-{i}" for i in itertools.count(1))
        self._clock = itertools.count(1)

    def mutations(self) -> list[tuple]:
        return [c for c in self.calls if not c[0].startswith(("list_", "get_", "create_experiment"))]

    # ------------------------------------------------------------------ pipelines
    def get_pipeline_id(self, name):
        self.calls.append(("get_pipeline_id", name))
        p = self.pipelines.get(name)
        return p.pipeline_id if p else None

    def _add_version(self, pipeline_id, name, description, path):
        spec = next(yaml.safe_load_all(Path(path).read_text()))  # a real package must parse
        # the API returns the version's spec with it (backend/src/apiserver/server/api_converter.go
        # toApiPipelineVersion: PipelineSpec)
        v = api.V2beta1PipelineVersion(pipeline_id=pipeline_id, pipeline_version_id=next(self._ids), display_name=name,
                                       description=description, pipeline_spec=spec,
                                       created_at=datetime.datetime(2026, 1, 1) + datetime.timedelta(seconds=next(self._clock)))
        self.versions[pipeline_id].append(v)
        # the server keeps the spec, not the uploaded file (the client may upload a temporary copy)
        self.version_specs = {**getattr(self, "version_specs", {}), v.pipeline_version_id: spec}
        return v

    def upload_pipeline(self, pipeline_package_path, pipeline_name=None, description=None, namespace=None):
        self.calls.append(("upload_pipeline", pipeline_name, description))
        p = api.V2beta1Pipeline(pipeline_id=next(self._ids), display_name=pipeline_name, description=description)
        self.pipelines[pipeline_name] = p
        self.versions[p.pipeline_id] = []
        self._add_version(p.pipeline_id, pipeline_name, description, pipeline_package_path)  # KFP's default version
        return p

    def upload_pipeline_version(self, pipeline_package_path, pipeline_version_name, pipeline_id=None,
                                pipeline_name=None, description=None):
        self.calls.append(("upload_pipeline_version", pipeline_version_name, pipeline_id, description))
        if any(v.display_name == pipeline_version_name for v in self.versions[pipeline_id]):
            raise api.ApiException(status=409, reason="Conflict")
        return self._add_version(pipeline_id, pipeline_version_name, description, pipeline_package_path)

    def list_pipeline_versions(self, pipeline_id, page_token="", page_size=10, sort_by="", filter=None):
        self.calls.append(("list_pipeline_versions", pipeline_id, page_token))
        items, token = self._page(self.versions.get(pipeline_id, []), page_token)
        return api.V2beta1ListPipelineVersionsResponse(pipeline_versions=items, next_page_token=token)

    def _page(self, items, token):
        start = int(token or 0)
        end = start + self.PAGE
        return items[start:end], (str(end) if end < len(items) else "")

    # ------------------------------------------------------------------ runs
    def create_experiment(self, name, description=None, namespace=None):
        self.calls.append(("create_experiment", name, namespace))
        return api.V2beta1Experiment(experiment_id=f"exp-{name}", display_name=name, namespace=namespace)

    def _check_params(self, params, package=None, version_id=None):
        if package:
            spec = next(yaml.safe_load_all(Path(package).read_text()))
        else:
            assert any(v.pipeline_version_id == version_id for vs in self.versions.values() for v in vs), version_id
            spec = getattr(self, "version_specs", {}).get(version_id)  # the version's own spec
            if spec is None:
                spec = next(yaml.safe_load_all((Path(__file__).parents[1] / "pipelines" / "llm_neo.yaml").read_text()))
        declared = spec["root"]["inputDefinitions"]["parameters"]
        unknown = set(params) - set(declared)
        if unknown:
            raise api.ApiException(status=400, reason=f"unknown parameters {unknown}")
        json.dumps(params)  # must serialize

    def run_pipeline(self, experiment_id, job_name, pipeline_package_path=None, params=None, pipeline_id=None,
                     version_id=None, pipeline_root=None, enable_caching=None, cache_key=None, service_account=None):
        self._check_params(params or {}, pipeline_package_path, version_id)
        images = sorted({ex["container"]["image"] for ex in next(yaml.safe_load_all(Path(
            pipeline_package_path).read_text()))["deploymentSpec"]["executors"].values()}) if pipeline_package_path else None
        run = dict(experiment_id=experiment_id, job_name=job_name, package=pipeline_package_path, params=params,
                   images=images,
                   pipeline_id=pipeline_id, version_id=version_id, enable_caching=enable_caching,
                   service_account=service_account)
        self.calls.append(("run_pipeline", run))
        self.runs.append(run)
        return api.V2beta1Run(run_id=next(self._ids), display_name=job_name, experiment_id=experiment_id)

    # ------------------------------------------------------------------ recurring runs
    def list_recurring_runs(self, page_token="", page_size=10, sort_by="", experiment_id=None, namespace=None,
                            filter=None):
        self.calls.append(("list_recurring_runs", experiment_id, page_token))
        mine = [r for r in self.recurring.values() if r.experiment_id == experiment_id]
        items, token = self._page(mine, page_token)
        return api.V2beta1ListRecurringRunsResponse(recurring_runs=items, next_page_token=token)

    def create_recurring_run(self, experiment_id, job_name, description=None, start_time=None, end_time=None,
                             interval_second=None, cron_expression=None, max_concurrency=1, no_catchup=None,
                             params=None, pipeline_package_path=None, pipeline_id=None, version_id=None,
                             enabled=True, pipeline_root=None, enable_caching=None, cache_key=None,
                             service_account=None):
        self._check_params(params or {}, pipeline_package_path, version_id)
        assert cron_expression and len(cron_expression.split()) == 6, cron_expression  # KFP: seconds first
        run = api.V2beta1RecurringRun(
            recurring_run_id=next(self._ids), display_name=job_name, description=description,
            experiment_id=experiment_id, pipeline_version_reference=api.V2beta1PipelineVersionReference(
                pipeline_id=pipeline_id, pipeline_version_id=version_id),
            runtime_config=api.V2beta1RuntimeConfig(parameters=params), service_account=service_account,
            max_concurrency=str(max_concurrency), no_catchup=no_catchup, status="ENABLED" if enabled else "DISABLED",
            trigger=api.V2beta1Trigger(cron_schedule=api.V2beta1CronSchedule(cron=cron_expression)))
        self.recurring[run.recurring_run_id] = run
        self.calls.append(("create_recurring_run", job_name, run.recurring_run_id))
        return run

    def disable_recurring_run(self, recurring_run_id):
        self.calls.append(("disable_recurring_run", recurring_run_id))
        self.recurring[recurring_run_id].status = "DISABLED"
        return {}

    def delete_recurring_run(self, recurring_run_id):
        self.calls.append(("delete_recurring_run", recurring_run_id))
        del self.recurring[recurring_run_id]
        return {}
