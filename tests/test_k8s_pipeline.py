"""Kubernetes task settings of the compiled pipeline (kfp-kubernetes platform spec + container
resources): GPUs, node selector and tolerations from pipeline parameters, /dev/shm, secrets as env,
deadlines, the TaskConfig passthrough of the multi-node branch, and the distill component's
GPU/node overrides."""


import pytest
import yaml

from conftest import REPO

PARAMS = {"config", "distill_gpus", "distill_nodes", "eval_gpus", "gpu_node_selector", "gpu_tolerations", "registry_uri"}


@pytest.fixture(scope="module")
def compiled():
    spec, platform = yaml.safe_load_all((REPO / "pipelines" / "llm_neo.yaml").read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def container(spec, name):
    return spec["deploymentSpec"]["executors"][f"exec-{name}"]["container"]


def test_gpu_counts_are_string_pipeline_parameters(compiled):
    """Upstream rule (kubeflow/pipelines 2.17.0, backend/src/v2/driver/driver.go initPodSpecPatch →
    resolve.go resolvePodSpecInputRuntimeParameter): the driver reads an accelerator count placeholder
    with ``GetStringValue()``, which is "" for a NUMBER_INTEGER value, so the GPU limit silently
    vanishes. GPU counts must be STRING parameters, on every task whose pod spec uses them."""
    spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name in ("distill_gpus", "eval_gpus"):
        assert params[name]["parameterType"] == "STRING", name
    # the UI's defaults alone make sense: the tiny preset on CPU, no GPU asked for
    assert params["preset"]["defaultValue"] == "tiny"
    assert params["distill_gpus"]["defaultValue"] == "0" and params["eval_gpus"]["defaultValue"] == "0"
    assert params["distill_nodes"]["defaultValue"] == 1
    # every component input fed from a GPU parameter is STRING too (the channel keeps the type)
    for comp_name, comp in spec["components"].items():
        for pname, pdef in comp.get("inputDefinitions", {}).get("parameters", {}).items():
            if pname.endswith(("distill_gpus", "eval_gpus")) or (comp_name.startswith("comp-distill") and pname == "gpus"):
                assert pdef["parameterType"] == "STRING", (comp_name, pname)
    for name, param in ("distill", "distill_gpus"), ("distill-multinode", "distill_gpus"), ("merge-eval", "eval_gpus"):
        acc = container(spec, name)["resources"]["accelerator"]
        assert acc["resourceType"] == "nvidia.com/gpu"
        assert acc["resourceCount"] == f"{{{{$.inputs.parameters['pipelinechannel--{param}']}}}}"
    for light in ("prep-data", "load-teacher", "register"):  # CPU only
        res = container(spec, light)["resources"]
        assert "accelerator" not in res and res["resourceCpuRequest"] and res["resourceMemoryRequest"]


def test_gpu_pool_selector_tolerations_shm_and_deadlines(compiled):
    _, executors = compiled
    for name in ("distill", "distill-multinode", "merge-eval"):
        ex = executors[f"exec-{name}"]
        assert ex["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"].endswith("gpu_node_selector")
        (tol,) = ex["tolerations"]
        assert tol["tolerationJson"]["componentInputParameter"].endswith("gpu_tolerations")
    for name in ("distill", "merge-eval"):
        assert {"medium": "Memory", "mountPath": "/dev/shm", "volumeName": "dshm"} in executors[f"exec-{name}"]["emptyDirMounts"]
    assert "emptyDirMounts" not in executors["exec-distill-multinode"]  # the launcher pod trains nothing
    for light in ("prep-data", "load-teacher", "register"):
        assert "nodeSelector" not in executors[f"exec-{light}"] and "tolerations" not in executors[f"exec-{light}"]
    deadlines = {k.removeprefix("exec-"): int(v["activeDeadlineSeconds"]) for k, v in executors.items()}
    assert deadlines["distill"] == deadlines["distill-multinode"] == 72 * 3600
    assert all(deadlines[k] > 0 for k in ("prep-data", "load-teacher", "merge-eval", "register"))


def test_each_step_gets_only_the_secrets_it_needs(compiled):
    """Least privilege: the hub token only where hub sources are resolved online (prep: hf: data;
    load-teacher: hf: models, pinned into the cache the later steps read); S3 wherever s3:// inputs,
    checkpoints, staging or the registry may be touched."""
    _, executors = compiled
    assert len(executors) == 7
    want = {"generate-answers": {"llmneo-s3", "llmneo-hub"}, "prep-data": {"llmneo-s3", "llmneo-hub"}, "load-teacher": {"llmneo-s3", "llmneo-hub"},
            "distill": {"llmneo-s3"}, "distill-multinode": {"llmneo-s3"}, "merge-eval": {"llmneo-s3"},
            "register": {"llmneo-s3"}}
    assert {name.removeprefix("exec-") for name in executors} == set(want)
    for name, ex in executors.items():
        got = {s["secretName"]: ({k["secretKey"]: k["envVar"] for k in s["keyToEnv"]}, s["optional"])
               for s in ex["secretAsEnv"]}
        assert set(got) == want[name.removeprefix("exec-")], name
        assert got["llmneo-s3"][0]["AWS_SECRET_ACCESS_KEY"] == "AWS_SECRET_ACCESS_KEY", name
        assert got["llmneo-s3"][1] is True, name  # optional: a run without S3 still starts
        if "llmneo-hub" in got:
            assert got["llmneo-hub"] == ({"HF_TOKEN": "HF_TOKEN"}, True), name
        if name != "exec-register":
            assert ex["pvcMount"][0]["mountPath"] == "/cache"


def test_multinode_branch_forwards_settings_through_task_config(compiled):
    spec, _ = compiled
    passthrough = {p["field"]: p.get("applyToTask", False)
                   for p in spec["components"]["comp-distill-multinode"]["taskConfigPassthroughs"]}
    assert passthrough == {"RESOURCES": False, "KUBERNETES_TOLERATIONS": False, "KUBERNETES_NODE_SELECTOR": False,
                           "KUBERNETES_AFFINITY": False, "KUBERNETES_VOLUMES": False, "ENV": True}
    assert "taskConfigPassthroughs" not in spec["components"]["comp-distill"]  # one node: all on the pod
    env = {e["name"]: e["value"] for e in container(spec, "distill-multinode")["env"]}
    assert env["LLMNEO_IMAGE"] == container(spec, "distill-multinode")["image"]
    branches = spec["components"]["comp-condition-branches-1"]["dag"]
    conds = {t["taskInfo"]["name"]: t.get("triggerPolicy", {}).get("condition", "") for t in branches["tasks"].values()}
    assert "== 1" in conds["one-node"] and "distill_nodes" in conds["one-node"]
    (oneof,) = branches["outputs"]["artifacts"].values()
    assert {s["outputArtifactKey"] for s in oneof["artifactSelectors"]} == {
        "pipelinechannel--distill-adapter", "pipelinechannel--distill-multinode-adapter"}
    adapter = spec["root"]["dag"]["tasks"]["merge-eval"]["inputs"]["artifacts"]["adapter"]["taskOutputArtifact"]
    assert adapter["producerTask"] == "condition-branches-1"


def test_new_parameters_have_one_line_descriptions(compiled):
    spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert PARAMS <= set(params)
    for name, p in params.items():
        assert p.get("description") and "\n" not in p["description"], name


def test_distill_component_passes_gpu_and_node_counts(monkeypatch, tmp_path):
    """The pipeline's GPU/node counts become distill.nproc_per_node / distill.nnodes; the TaskConfig
    is handed to the launcher as an argument."""
    from kfp import dsl

    import llmneo.steps
    from llmneo.cards import DistillCard
    from llmneo_components.distill import distill

    seen = {}

    def fake_run_distill(cfg, dataset, teacher, student, out, task_config=None):
        seen.update(nproc=cfg.distill.nproc_per_node, nnodes=cfg.distill.nnodes, task=task_config)
        return DistillCard(method="neo", steps=1, final={"loss": 1.0}, tokens_per_s=1.0,
                           trainable_parameters=1, wall_seconds=1.0)

    monkeypatch.setattr(llmneo.steps, "distill_student", fake_run_distill)
    monkeypatch.setenv("LLMNEO_WORKFLOW", "run-7")
    art = {k: dsl.Model(uri=str(tmp_path / k)) for k in ("dataset", "teacher", "student", "adapter", "metrics")}
    for a in art.values():
        a.path = a.uri
    metrics = dsl.Metrics(uri=str(tmp_path / "m"))
    distill.python_func(preset="tiny", overrides=[], config="", gpus="6", nodes=1, dataset=art["dataset"], teacher=art["teacher"],
                        student=art["student"], adapter=art["adapter"], metrics=metrics)
    assert seen == {"nproc": 6, "nnodes": 1, "task": None}
    distill.python_func(preset="tiny", overrides=["distill.nproc_per_node=3"], config="", gpus="0", nodes=2,
                        dataset=art["dataset"], teacher=art["teacher"], student=art["student"], adapter=art["adapter"],
                        metrics=metrics, task_config=dsl.TaskConfig(node_selector={"pool": "a100"}))
    assert seen["nproc"] == 3 and seen["nnodes"] == 2  # gpus=0: the preset's process count
    assert seen["task"]["node_selector"] == {"pool": "a100"}
    with pytest.raises(SystemExit) as exc:  # one error: line, no traceback
        distill.python_func(preset="tiny", overrides=[], config="", gpus="six", nodes=1, dataset=art["dataset"],
                            teacher=art["teacher"], student=art["student"], adapter=art["adapter"], metrics=metrics)
    assert exc.value.code == 2


def test_components_load_the_sent_configuration_before_the_preset():
    """``config`` (the resolved configuration llmneo submit sends) replaces the preset; overrides and
    the step's own settings apply on top, in that order."""
    from llmneo.config import dump_yaml, load_config
    from llmneo_components.params import load_run_config, parse_gpus

    mine = load_config("tiny", ["distill.alpha=0.25", "distill.max_steps=7"])
    cfg = load_run_config("mine.yaml", ["distill.max_steps=9"], dump_yaml(mine), ["distill.nnodes=1"])
    assert (cfg.distill.alpha, cfg.distill.max_steps) == (0.25, 9)  # "mine.yaml" is only a label here
    assert load_run_config("tiny", [], "").distill.alpha == load_config("tiny").distill.alpha
    assert parse_gpus(" 6 ") == 6 and parse_gpus("0") == 0
    with pytest.raises(SystemExit):
        load_run_config("tiny", [], "- not a mapping")


def test_launcher_task_gets_its_pod_identity(compiled):
    """The multi-node launcher owns its TrainJob (ownerReference to its pod) and names it after the
    run's workflow: kfp-kubernetes fieldPathAsEnv (downward API) gives it name, uid and workflow."""
    from llmneo.cluster import POD_IDENTITY_ENV

    _, executors = compiled
    got = {e["name"]: e["fieldPath"] for e in executors["exec-distill-multinode"]["fieldPathAsEnv"]}
    assert got == POD_IDENTITY_ENV


def dag_tasks(spec):
    """Every task of the compiled DAG (root and sub-DAGs of the If/Else branches), by name."""
    found = {"root": spec["root"]["dag"]["tasks"]}
    for comp in spec["components"].values():
        found.update({f"{k}": v for k, v in comp.get("dag", {}).get("tasks", {}).items()})
    return found | {k: v for k, v in found["root"].items()}


def test_register_takes_the_registry_uri_parameter(compiled):
    """A KFP task's pod keeps no files after it ends (only volumes and output artifacts outlive it):
    the registry comes from the ``registry_uri`` pipeline parameter (empty: the configuration's), and
    the register task mounts no volume, so it must be an object store."""
    spec, executors = compiled
    param = spec["root"]["inputDefinitions"]["parameters"]["registry_uri"]
    assert param["parameterType"] == "STRING" and param["defaultValue"] == ""
    register = dag_tasks(spec)["register"]["inputs"]["parameters"]["registry_uri"]
    assert register == {"componentInputParameter": "pipelinechannel--registry_uri"}
    assert "pvcMount" not in executors["exec-register"]


def test_one_node_distill_checkpoints_on_the_cache_volume_keyed_by_run(compiled):
    """A retried task runs in a new pod whose output folder is a fresh emptyDir (KFP uploads outputs
    only on success): the one-node distill keeps its checkpoints under /cache/checkpoints/<run>/…
    on the cache PVC; <run> is the run's Argo workflow, read from the pod's label (downward API), the
    same for every retry of the run, and not an input of the task (see the cache test below)."""
    from llmneo.cluster import WORKFLOW_ENV, WORKFLOW_FIELD
    from llmneo_pipelines.llm_neo import CACHE_PVC, CHECKPOINTS

    spec, executors = compiled
    inputs = dag_tasks(spec)["distill"]["inputs"]["parameters"]
    assert inputs["checkpoints"] == {"runtimeValue": {"constant": CHECKPOINTS}}
    assert "run_id" not in inputs
    assert {"name": WORKFLOW_ENV, "fieldPath": WORKFLOW_FIELD} in executors["exec-distill"]["fieldPathAsEnv"]
    (mount,) = executors["exec-distill"]["pvcMount"]
    assert mount["constant"] == CACHE_PVC and CHECKPOINTS.startswith(mount["mountPath"] + "/")
    assert dag_tasks(spec)["distill"]["retryPolicy"]["maxRetryCount"] == 1


# The pipeline-job placeholders the KFP driver replaces per run in a task's runtimeValue constants.
RUN_PLACEHOLDERS = ("{{$.pipeline_job_uuid}}", "{{$.pipeline_job_name}}", "{{$.pipeline_job_resource_name}}",
                    "{{$.pipeline_task_uuid}}", "{{$.pipeline_task_name}}", "{{$.pipeline_job_create_time_utc}}",
                    "{{$.pipeline_job_schedule_time_utc}}")


def _cache_relevant_inputs(spec: dict, args: dict, run: str) -> dict:
    """Each cached task's input parameter values as the driver resolves them in run ``run``: pipeline
    parameters from ``args`` (else their defaults), constants with the run placeholders replaced."""
    root = spec["root"]["inputDefinitions"]["parameters"]
    values = {name: args.get(name, p.get("defaultValue")) for name, p in root.items()}
    resolved = {}
    for name, task in dag_tasks(spec).items():
        if name == "root" or not (task.get("cachingOptions") or {}).get("enableCache"):
            continue
        got = {}
        for pname, pin in task.get("inputs", {}).get("parameters", {}).items():
            if "componentInputParameter" in pin:
                got[pname] = values[pin["componentInputParameter"].removeprefix("pipelinechannel--")]
            elif "runtimeValue" in pin:
                value = pin["runtimeValue"]["constant"]
                for placeholder in RUN_PLACEHOLDERS:
                    if isinstance(value, str):
                        value = value.replace(placeholder, f"{run}:{placeholder}")
                got[pname] = value
            else:
                got[pname] = pin
        resolved[name] = got
    return resolved


def test_two_runs_of_the_same_configuration_have_the_same_cache_key_inputs(compiled):
    """Upstream rule (kubeflow/pipelines backend/src/v2/cacheutils/cache.go GenerateCacheKey, called by
    driver/cache.go): the fingerprint hashes every resolved input parameter value
    (``InputParameterValues``) with the container's image, command/args, PVC names and spec env; the
    driver resolves pipeline-job placeholders such as ``{{$.pipeline_job_uuid}}`` in a task's
    runtimeValue constants per run (backend/src/v2/driver/resolve.go resolveInputs). So no cached
    task may take one as an input: distill (72 h) would otherwise miss the cache on every run. The
    platform spec's field-path env (the run key of the checkpoints) is not part of the key."""
    spec, _ = compiled
    args = {"preset": "tiny", "config": "distill:\n  alpha: 0.5\n", "distill_gpus": "6"}
    first, second = (_cache_relevant_inputs(spec, args, run) for run in ("run-a", "run-b"))
    assert set(first) == {"generate-answers", "prep-data", "load-teacher", "distill", "distill-multinode", "merge-eval"}
    assert first == second
    # not vacuous: the run id as an input (as distill once had it) makes two runs differ
    import copy

    with_run_id = copy.deepcopy(spec)
    dag_tasks(with_run_id)["distill"]["inputs"]["parameters"]["run_id"] = {
        "runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}
    assert _cache_relevant_inputs(with_run_id, args, "run-a") != _cache_relevant_inputs(with_run_id, args, "run-b")
    # register is never cached (it writes to an external registry): it may record the run id
    register = dag_tasks(spec)["register"]["inputs"]["parameters"]["run_id"]
    assert register == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}


def test_checkpoint_setting_is_run_and_configuration_keyed(tmp_path):
    from llmneo.config import load_config
    from llmneo_components.params import checkpoint_setting

    cfg = load_config("tiny", ["distill.nnodes=1"])
    root = str(tmp_path / "checkpoints")  # its parent exists: the volume is mounted
    (setting,) = checkpoint_setting(cfg, root, "9f2c-run")
    assert setting == f"distill.checkpoint_uri={root}/9f2c-run/{cfg.fingerprint()}"
    other = load_config("tiny", ["distill.alpha=0.9"])
    assert checkpoint_setting(other, root, "9f2c-run") != [setting]  # another configuration, another folder
    assert checkpoint_setting(cfg, root, "../x")[0].endswith(f"/.._x/{cfg.fingerprint()}")  # no path escape
    assert checkpoint_setting(cfg, str(tmp_path / "absent" / "checkpoints"), "r") == []  # no volume: in the output
    assert checkpoint_setting(load_config("tiny", ["distill.checkpoint_uri=/mine"]), root, "r") == []  # user's wins
    assert checkpoint_setting(load_config("tiny", ["distill.nnodes=2"]), root, "r") == []
    assert checkpoint_setting(cfg, "", "r") == [] and checkpoint_setting(cfg, root, "") == []


def test_distill_component_sets_the_checkpoint_location(monkeypatch, tmp_path):
    """The run key comes from $LLMNEO_WORKFLOW (the pod's workflow label), not from an input."""
    from kfp import dsl

    import llmneo.steps
    from llmneo.cards import DistillCard
    from llmneo.config import load_config
    from llmneo_components.distill import distill

    seen = {}

    def fake_run_distill(cfg, dataset, teacher, student, out, task_config=None):
        seen["uri"] = cfg.distill.checkpoint_uri
        return DistillCard(method="neo", steps=1, final={"loss": 1.0}, tokens_per_s=1.0,
                           trainable_parameters=1, wall_seconds=1.0)

    monkeypatch.setattr(llmneo.steps, "distill_student", fake_run_distill)
    monkeypatch.setenv("LLMNEO_WORKFLOW", "run-7")
    art = {k: dsl.Model(uri=str(tmp_path / k)) for k in ("dataset", "teacher", "student", "adapter")}
    for a in art.values():
        a.path = a.uri
    distill.python_func(preset="tiny", overrides=[], config="", gpus="2", nodes=1, dataset=art["dataset"],
                        teacher=art["teacher"], student=art["student"], adapter=art["adapter"],
                        metrics=dsl.Metrics(uri=str(tmp_path / "m")), checkpoints=str(tmp_path / "checkpoints"))
    fp = load_config("tiny", ["distill.nnodes=1", "distill.nproc_per_node=2"]).fingerprint()
    assert seen["uri"] == f"{tmp_path}/checkpoints/run-7/{fp}"


def test_register_refuses_a_folder_on_no_volume_inside_a_kfp_pod(monkeypatch, tmp_path, capsys):
    """Upstream rule (kubeflow/pipelines backend/src/v2/compiler/argocompiler/container.go, commonEnvs):
    every KFP v2 task container gets KFP_POD_NAME / KFP_POD_UID (downward API); kfp.local sets neither.
    In such a pod, a registry folder on no mounted volume disappears with the pod."""
    from kfp import dsl

    from llmneo_components.params import _check_registry_in_pod
    from llmneo_components.register import register

    pod = {"KFP_POD_NAME": "llm-neo-abc-system-container-impl-1"}
    never = lambda p: False  # noqa: E731 - no volume anywhere
    with pytest.raises(Exception, match=r"^registry.uri: 'runs/registry' is a folder inside this pod \(on no "
                                        r"volume\), lost when the pod ends: run with the pipeline parameter "
                                        r"registry_uri=s3://BUCKET/PREFIX"):
        _check_registry_in_pod("runs/registry", pod, never)
    _check_registry_in_pod("s3://models/registry", pod, never)  # an object store: fine
    _check_registry_in_pod("runs/registry", {}, never)  # not in a KFP pod (llmneo run, kfp.local): fine
    _check_registry_in_pod("/mnt/models/registry", pod, lambda p: p == "/mnt/models")  # on a mounted volume
    with pytest.raises(Exception, match="is a folder inside this pod"):
        _check_registry_in_pod("file:///srv/registry", pod, never)

    # the component: registry_uri overrides the configuration's, the check runs before any upload
    monkeypatch.setenv("KFP_POD_NAME", "pod-1")
    monkeypatch.setattr("os.path.ismount", never)  # wherever tmp_path is (a tmpfs /tmp is a mount)
    monkeypatch.chdir(tmp_path)
    model = dsl.Model(uri=str(tmp_path / "model"))
    model.path = model.uri
    with pytest.raises(SystemExit) as exc:  # a folder named explicitly: refused
        register.python_func(preset="tiny", overrides=[], config="", run_id="r", model=model,
                             metrics=dsl.Metrics(uri=str(tmp_path / "m")), registry_uri="runs/registry")
    assert exc.value.code == 2 and "registry.uri: 'runs/registry' is a folder inside this pod" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit):  # an s3 registry passes the check; the model folder has no card
        register.python_func(preset="tiny", overrides=[], config="", run_id="r", model=model,
                             metrics=dsl.Metrics(uri=str(tmp_path / "m")), registry_uri="s3://models/registry")
    err = capsys.readouterr().err
    assert "is a folder inside this pod" not in err and "card.json" in err, err


def test_a_ui_run_with_the_defaults_skips_register_visibly(compiled, monkeypatch, tmp_path, capsys):
    """Upstream rule (kubeflow/pipelines frontend/src/components/NewRunParametersV2.tsx: the Create Run
    form starts from each root parameter's ``defaultValue``; the driver fills an omitted one from it,
    backend/src/v2/driver root DAG → runtime config defaults): a run started in the UI as is gets
    preset=tiny and registry_uri="", whose registry.uri is the local runs/registry. Inside a pod that
    folder is lost, so register neither fails the run nor pretends: it returns "skipped: no s3
    registry" (the task's output, shown in the UI) and logs registered=0."""
    import json

    from kfp import dsl

    from llmneo_components.params import REGISTER_SKIPPED
    from llmneo_components.register import register

    spec, _ = compiled
    defaults = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    assert defaults["preset"] == "tiny" and defaults["registry_uri"] == "" and defaults["config"] == ""
    monkeypatch.setenv("KFP_POD_NAME", "pod-1")
    monkeypatch.setattr("os.path.ismount", lambda p: False)
    monkeypatch.chdir(tmp_path)
    model = dsl.Model(uri=str(tmp_path / "model"))
    model.path = model.uri
    metrics = dsl.Metrics(uri=str(tmp_path / "m"))
    out = register.python_func(preset=defaults["preset"], overrides=defaults["overrides"], config=defaults["config"],
                               run_id="r", model=model, metrics=metrics, registry_uri=defaults["registry_uri"])
    assert out == REGISTER_SKIPPED == "skipped: no s3 registry"
    assert metrics.metadata == {"registered": 0}
    assert "register: skipped: no s3 registry: registry.uri='runs/registry'" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()
    json.dumps(out)


def test_multinode_distill_checkpoints_on_the_forwarded_cache_volume(compiled, monkeypatch, tmp_path):
    """Upstream rule (kubeflow/pipelines sdk/python/kfp/dsl/task_config.py TaskConfig, passthrough
    KUBERNETES_VOLUMES: the task's PVC mounts go to the function as ``volumes``/``volume_mounts``
    instead of onto the launcher pod; llmneo.cluster.build_trainjob puts them on every node). A node's
    own folders are emptyDirs that die with a failed TrainJob, which the retried launcher deletes and
    re-creates: the checkpoints go to the forwarded cache PVC, keyed like one-node runs, so the new
    TrainJob resumes there. Without a forwarded PVC, no override (a node's emptyDir would not last)."""
    from kfp import dsl

    import llmneo.steps
    from llmneo.cards import DistillCard
    from llmneo.cluster import shared_volume_at
    from llmneo.config import load_config
    from llmneo_components.distill import distill
    from llmneo_pipelines.llm_neo import CHECKPOINTS

    spec, _ = compiled
    inputs = dag_tasks(spec)["distill-multinode"]["inputs"]["parameters"]
    assert inputs["checkpoints"] == {"runtimeValue": {"constant": CHECKPOINTS}}
    root = tmp_path / "cache" / "checkpoints"
    root.parent.mkdir()
    pvc = {"volumes": [{"name": "llmneo-cache", "persistentVolumeClaim": {"claimName": "llmneo-cache"}}],
           "volume_mounts": [{"name": "llmneo-cache", "mountPath": str(root.parent)}]}
    assert shared_volume_at(pvc, str(root)) and not shared_volume_at(pvc, "/elsewhere/checkpoints")
    assert not shared_volume_at({"volumes": [{"name": "x", "emptyDir": {}}],
                                 "volume_mounts": [{"name": "x", "mountPath": str(root.parent)}]}, str(root))
    seen = []

    def fake(cfg, *args, **kwargs):
        seen.append(cfg.distill.checkpoint_uri)
        return DistillCard(method="neo", steps=1, final={"loss": 1.0}, tokens_per_s=1.0, trainable_parameters=1,
                           wall_seconds=1.0)

    monkeypatch.setattr(llmneo.steps, "distill_student", fake)
    monkeypatch.setenv("LLMNEO_WORKFLOW", "llm-neo-x7")
    for task_config in (dsl.TaskConfig(**pvc), None):
        art = {k: dsl.Model(uri=str(tmp_path / k)) for k in ("dataset", "teacher", "student", "adapter")}
        for a in art.values():
            a.path = a.uri
        distill.python_func(preset="tiny", overrides=["cluster.staging_uri=s3://b/s"], config="", gpus="2", nodes=2,
                            dataset=art["dataset"], teacher=art["teacher"], student=art["student"],
                            adapter=art["adapter"], metrics=dsl.Metrics(uri=str(tmp_path / "m")),
                            checkpoints=str(root), task_config=task_config)
    fp = load_config("tiny", ["cluster.staging_uri=s3://b/s", "distill.nnodes=2",
                              "distill.nproc_per_node=2"]).fingerprint()
    assert seen == [f"{root}/llm-neo-x7/{fp}", ""]


def test_retries_are_documented_as_argo_applies_them(compiled):
    """Upstream rules: KFP's Argo compiler turns a task's retryPolicy into a retryStrategy with a limit
    and a back-off only (kubeflow/pipelines backend/src/v2/compiler/argocompiler/container.go
    getTaskRetryStrategyFromInput: no RetryPolicy), and Argo's default policy is then OnFailure
    (argoproj/argo-workflows workflow/controller/operator.go processNodeRetries, RetryStrategy
    .RetryPolicyActual): a Failed node is retried, an Error node (a deleted pod) is not. The KFP spec
    has no field to ask for more, which this test would show; docs/kubeflow.md says what is retried."""
    spec, _ = compiled
    policy = dag_tasks(spec)["distill"]["retryPolicy"]
    assert set(policy) <= {"maxRetryCount", "backoffDuration", "backoffFactor", "backoffMaxDuration"}
    assert policy["maxRetryCount"] == 1
    text = (REPO / "docs" / "kubeflow.md").read_text()
    assert "| Error (\"pod deleted\") | **no** |" in text and "`OnFailure`" in text and "**Retry**" in text
