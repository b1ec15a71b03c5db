"""The sweep: plan (grid → points), a failing point recorded not raised, selection by the points'
own cards, the report; the compiled sweep pipeline (ParallelFor, parallelism, parameters)."""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from llmneo.cards import EvalCard
from llmneo.config import load_config
from llmneo.errors import UserError, guarded
from llmneo.sweep import POINT_ENV, POINT_FILE, SWEEP_FILE, PointGuard, plan_points, select_winner


def resolve(point):
    return load_config("tiny", point)


def test_plan_is_the_cartesian_product_after_the_shared_overrides():
    points = plan_points(["distill.max_steps=2"], ["distill.alpha=0.5,0.9", "distill.lora_rank=16,64"], resolve)
    assert points == [["distill.max_steps=2", "distill.alpha=0.5", "distill.lora_rank=16"],
                      ["distill.max_steps=2", "distill.alpha=0.5", "distill.lora_rank=64"],
                      ["distill.max_steps=2", "distill.alpha=0.9", "distill.lora_rank=16"],
                      ["distill.max_steps=2", "distill.alpha=0.9", "distill.lora_rank=64"]]
    # identical points once: a point's overrides (its cache key) do not depend on the rest of the grid
    assert plan_points([], ["distill.alpha=0.5,0.5,0.9"], resolve) == [["distill.alpha=0.5"], ["distill.alpha=0.9"]]
    widened = plan_points(["distill.max_steps=2"], ["distill.alpha=0.5,0.9,0.7", "distill.lora_rank=16,64"], resolve)
    assert all(p in widened for p in points)


@pytest.mark.parametrize("grid, message", [
    (["data.max_length=64,128"], "--grid data.max_length: the sweep prepares the data and loads the teacher once"),
    (["distill.alpha=0.5,7"], "grid point distill.alpha=7: distill.alpha"),
    (["distill.alpha"], "--grid 'distill.alpha': expected KEY=V1,V2"),
])
def test_plan_refuses_bad_grids_in_one_line(grid, message):
    with pytest.raises(UserError) as e:
        plan_points([], grid, resolve)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_point_guard_records_a_failure_and_passes_it_on(tmp_path, capsys):
    """Why a point records its failure instead of failing its task (what this relies on upstream):
    on Argo, KFP's ParallelFor iterations are tasks of a DAG template whose fail-fast is on by default
    (argoproj/argo-workflows docs/walk-through/dag.md, DAGTemplate.FailFast: "stop scheduling new
    steps, as soon as it detects that one of the DAG nodes is failed"), so one failed point would stop
    the points not yet started and fail the loop, and nothing after the loop would run. The SDK's
    escape, ``PipelineTask.ignore_upstream_failure`` (kfp 2.17, kfp/dsl/pipeline_task.py), refuses a
    task whose inputs are upstream outputs without a default, which select's ``dsl.Collected`` models
    are. So the failure is data: ``sweep_point.json`` with status failed, the task succeeds."""
    env = {POINT_ENV: "1"}

    def fails():
        raise UserError("distill: torchrun exited with code 1")

    with PointGuard(tmp_path / "adapter", ["distill.alpha=0.9"], "distill", env=env):
        guarded(fails)
    record = json.loads((tmp_path / "adapter" / POINT_FILE).read_text())
    assert record == {"overrides": ["distill.alpha=0.9"], "step": "distill", "status": "failed",
                      "error": "distill: torchrun exited with code 1", "failed_step": "distill"}
    ran = []
    with PointGuard(tmp_path / "model", ["distill.alpha=0.9"], "merge-eval", upstream=tmp_path / "adapter",
                    env=env) as point:
        if point.run:
            ran.append(True)
    assert not ran and point.error_line() == "distill: distill: torchrun exited with code 1"
    assert json.loads((tmp_path / "model" / POINT_FILE).read_text())["status"] == "failed"
    # outside a sweep: nothing recorded, the failure propagates as before
    with pytest.raises(SystemExit), PointGuard(tmp_path / "plain", [], "distill", env={}):
        guarded(fails)
    assert not (tmp_path / "plain").exists()


def fake_point(folder, overrides, kl, agree, passed=True):
    folder.mkdir(parents=True)
    metrics = {"kl_to_teacher": kl, "top1_agreement": agree, "perplexity": 10.0}
    EvalCard(method="neo", metrics=metrics, gate={"passed": passed, "reasons": [] if passed else ["kl too high"]},
             config_hash=f"h{kl}{agree}").write(folder)
    (folder / "eval.json").write_text(json.dumps({"distill": {"wall_seconds": 3.5, "tokens_per_s": 1000.0,
                                                               "peak_mem_mb": 12.0}}))
    (folder / "weights.bin").write_bytes(b"w" * 8)
    (folder / POINT_FILE).write_text(json.dumps({"overrides": overrides, "status": "ok"}))
    return folder


def test_select_ranks_by_kl_breaks_ties_and_skips_failed_points(tmp_path):
    base = ["distill.max_steps=2"]
    a = fake_point(tmp_path / "a", [*base, "distill.alpha=0.5"], 0.30, 0.5)
    b = fake_point(tmp_path / "b", [*base, "distill.alpha=0.7"], 0.20, 0.4)
    c = fake_point(tmp_path / "c", [*base, "distill.alpha=0.9"], 0.20, 0.6)  # tie on KL, better agreement
    d = tmp_path / "d"
    d.mkdir()
    (d / POINT_FILE).write_text(json.dumps({"overrides": [*base, "distill.alpha=0.1"], "status": "failed",
                                            "failed_step": "distill", "error": "out of memory"}))
    table = select_winner([a, b, c, d], base, ["kl_to_teacher", "top1_agreement"], tmp_path / "win", tmp_path / "rep")
    assert table["winner"] == 2 and table["gate"] == "pass"
    assert [p.get("rank") for p in table["points"]] == [3, 2, 1, None]
    assert table["points"][3]["status"] == "failed" and "out of memory" in table["points"][3]["error"]
    assert (tmp_path / "win" / "weights.bin").read_bytes() == b"w" * 8  # the winner's folder
    lineage = json.loads((tmp_path / "win" / SWEEP_FILE).read_text())
    assert [p["overrides"] for p in lineage["points"]] == [["distill.alpha=0.5"], ["distill.alpha=0.7"],
                                                           ["distill.alpha=0.9"], ["distill.alpha=0.1"]]
    assert lineage["points"][2]["winner"] and lineage["points"][2]["metrics"]["top1_agreement"] == 0.6
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "★ winner" in md and "failed: distill: out of memory" in md and "](data:image/png;base64," in md
    assert (tmp_path / "rep" / "sweep.png").stat().st_size > 1000
    assert "data:image/png;base64," in (tmp_path / "rep" / "report.html").read_text()
    # higher-is-better first: agreement
    table = select_winner([a, b, c], base, ["top1_agreement"], tmp_path / "w2", tmp_path / "r2")
    assert table["winner"] == 2
    table = select_winner([a, b, c], base, ["min:top1_agreement"], tmp_path / "w3", tmp_path / "r3")
    assert table["winner"] == 1


def test_select_with_every_point_failed_or_gated(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / POINT_FILE).write_text(json.dumps({"overrides": [], "status": "failed", "step": "distill", "error": "x"}))
    table = select_winner([d, tmp_path / "missing"], [], [], tmp_path / "w", tmp_path / "r")
    assert table["winner"] is None and table["gate"] == "fail"
    assert "Every one of the 2 points failed" in (tmp_path / "r" / "report.md").read_text()
    g = fake_point(tmp_path / "g", ["distill.alpha=0.5"], 0.3, 0.5, passed=False)
    assert select_winner([g], [], [], tmp_path / "w2", tmp_path / "r2")["gate"] == "fail"
    with pytest.raises(UserError, match="sweep metric 'nope': no point has it"):
        select_winner([g], [], ["nope"], tmp_path / "w3", tmp_path / "r3")


# --------------------------------------------------------------------------------------------
# The compiled sweep pipeline
# --------------------------------------------------------------------------------------------


def compile_sweep(tmp_path, *args):
    out = tmp_path / "llm_neo_sweep.yaml"
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("LLMNEO_IMAGE", "LLMNEO_CPU_IMAGE")}
    subprocess.run([sys.executable, "-m", "llmneo_pipelines.llm_neo_sweep", "--output", str(out), *args],
                   check=True, env=env, capture_output=True)
    return out


def test_sweep_yaml_parallel_for_parallelism_and_parameters(tmp_path):
    """The loop is KFP's ParallelFor over the plan step's output; its parallelism is the compiled
    ``iteratorPolicy.parallelismLimit`` (kfp/dsl/tasks_group.py ParallelFor takes an int;
    api/v2alpha1/pipeline_spec.proto IteratorPolicy.parallelism_limit is an int32: not a runtime
    parameter). Select collects every point's model (dsl.Collected), register sits behind the gate."""
    path = compile_sweep(tmp_path, "--parallelism", "3")
    docs = list(yaml.load_all(path.read_text(), Loader=yaml.SafeLoader))
    spec = docs[0]
    root = spec["root"]["dag"]["tasks"]
    (loop,) = [t for t in root.values() if "parameterIterator" in t]
    assert loop["iteratorPolicy"] == {"parallelismLimit": 3}
    assert loop["parameterIterator"]["items"]["inputParameter"].startswith("pipelinechannel--plan-sweep-Output")
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(body) == {"distill", "merge-eval"}
    assert body["merge-eval"]["inputs"]["artifacts"]["adapter"]["taskOutputArtifact"]["producerTask"] == "distill"
    for name in ("distill", "merge-eval"):  # a point's overrides are the loop item; no run id in its inputs
        params = body[name]["inputs"]["parameters"]
        assert params["overrides"]["componentInputParameter"].startswith("pipelinechannel--plan-sweep-Output-loop-item")
        assert "run_id" not in params
    env = {e["name"]: e["value"] for c in spec["deploymentSpec"]["executors"].values()
           for e in c["container"].get("env", [])}
    assert env.get("LLMNEO_SWEEP_POINT") == "1"
    assert {"prep-data", "load-teacher", "plan-sweep", "select-sweep"} <= set(root)
    assert root["select-sweep"]["cachingOptions"] == {}
    (loop_id,) = [k for k, t in root.items() if t is loop]
    assert root["select-sweep"]["inputs"]["artifacts"]["models"]["taskOutputArtifact"]["producerTask"] == loop_id
    (gate,) = [k for k, t in root.items() if t["taskInfo"]["name"] == "registration-gate"]
    assert "select-sweep-Output" in root[gate]["triggerPolicy"]["condition"]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == {"preset", "overrides", "config", "grid", "metrics", "max_kl_to_teacher", "gpus",
                           "gpu_node_selector", "gpu_tolerations", "registry_uri"}
    assert params["grid"]["parameterType"] == "LIST" and params["metrics"]["defaultValue"][0] == "kl_to_teacher"
    assert all(p.get("description") for p in params.values())


def test_committed_sweep_yaml_has_not_drifted(tmp_path):
    fresh = compile_sweep(tmp_path).read_text()
    assert fresh == (REPO / "pipelines" / "llm_neo_sweep.yaml").read_text(), \
        "pipelines/llm_neo_sweep.yaml is stale: run `make pipeline` and commit it"


# --------------------------------------------------------------------------------------------
# Kubeflow: upload / submit --sweep / schedules (against the recording fake kfp.Client)
# --------------------------------------------------------------------------------------------


def test_submit_sweep_compiles_with_the_parallelism_and_sends_the_grid(tmp_path):
    from kfp_fake import FakeKfp

    from llmneo_pipelines import kfp_client

    fake = FakeKfp()
    seen = {}
    original = fake.run_pipeline

    def run_pipeline(**kwargs):  # the compiled package is a temporary file: read it while it exists
        if kwargs.get("pipeline_package_path"):
            seen["spec"] = next(yaml.safe_load_all(open(kwargs["pipeline_package_path"])))
        return original(**kwargs)

    fake.run_pipeline = run_pipeline
    params = {"registry_uri": "s3://models/registry"}
    package = kfp_client.sweep_package("tiny", ["distill.max_steps=2"], ["distill.alpha=0.5,0.9"],
                                       ["top1_agreement"], params, 2, tmp_path)
    kfp_client.submit(fake, "http://h", "tiny", ["distill.max_steps=2"], None, params, package=package,
                      pipeline=kfp_client.SWEEP_PIPELINE, image_registry="registry.example.com/team")
    (run,) = fake.runs
    assert run["params"]["grid"] == ["distill.alpha=0.5,0.9"] and run["params"]["metrics"] == ["top1_agreement"]
    (loop,) = [t for t in seen["spec"]["root"]["dag"]["tasks"].values() if "parameterIterator" in t]
    assert loop["iteratorPolicy"] == {"parallelismLimit": 2}
    with pytest.raises(UserError, match=r"^--sweep: give the swept settings with --grid"):
        kfp_client.sweep_package("tiny", [], [], [], {}, None, tmp_path)
    with pytest.raises(UserError, match=r"^grid point distill.alpha=2: distill.alpha"):
        kfp_client.sweep_package("tiny", [], ["distill.alpha=0.5,2"], [], {}, None, tmp_path)
    up = kfp_client.upload(fake, version="0.1.0", package=kfp_client._packaged_sweep(), pipeline=kfp_client.SWEEP_PIPELINE,
                           image_registry="registry.example.com/team")
    kfp_client.submit(fake, "http://h", "tiny", ["registry.uri=s3://models/registry"], None, {"grid": ["distill.alpha=0.5,0.9"]},
                      version="0.1.0", package=kfp_client._packaged_sweep(), pipeline=kfp_client.SWEEP_PIPELINE)
    assert fake.runs[-1]["version_id"] == up["version_id"]


def test_schedule_with_a_grid_runs_the_sweep(tmp_path):
    from llmneo_pipelines import kfp_client, schedules

    path = tmp_path / "s.yaml"
    path.write_text("name: weekly-sweep\ncron: '0 3 * * 1'\npreset: tiny\noverrides: [registry.uri=s3://models/registry]\n"
                    "grid: ['distill.alpha=0.5,0.9']\n")
    s = schedules.load_schedule(path, {})
    assert s.pipeline == kfp_client.SWEEP_PIPELINE and s.arguments["grid"] == ["distill.alpha=0.5,0.9"]
    path.write_text("name: bad\ncron: '0 3 * * 1'\npreset: tiny\ngrid: ['data.max_length=64,128']\n")
    with pytest.raises(UserError, match=r"s.yaml: --grid data.max_length: the sweep prepares the data"):
        schedules.load_schedule(path, {})
