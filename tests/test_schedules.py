"""`llmneo schedule sync` against a recording fake kfp.Client: create, keep (idempotent), replace
(create new → pause old → delete old), delete, dry-run, drift repair, validation before any call,
and the schedules shipped in k8s/schedules/."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from kfp_fake import FakeKfp

from conftest import REPO
from llmneo.config import preset_names
from llmneo.errors import UserError
from llmneo_pipelines import kfp_client, schedules


@pytest.fixture(autouse=True)
def image_registry(monkeypatch):
    """The packaged pipeline names the default images, refused without a registry of one's own."""
    monkeypatch.setenv("LLMNEO_IMAGE_REGISTRY", "registry.example.com/team")


POOL = REPO / "k8s" / "overlays" / "gke-a100" / "pool.yaml"


def write(folder, name, **fields):
    data = {"name": name, "cron": "0 2 * * *", "preset": "tiny", "pipeline_version": "0.1.0", **fields}
    data["parameters"] = {"registry_uri": "s3://models/registry", **fields.get("parameters", {})}  # outlives pods
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(data))


@pytest.fixture
def setup(tmp_path):
    fake = FakeKfp()
    kfp_client.upload(fake, version="0.1.0")
    folder = tmp_path / "schedules"
    folder.mkdir()
    (folder / "kustomization.yaml").write_text("resources: []\n")  # ignored by the reconciler
    write(folder, "nightly", overrides=["distill.max_steps=8"], parameters={"eval_gpus": 0})
    write(folder, "weekly", cron="30 4 * * 0", preset="smollm2-demo", enabled=False)
    fake.calls.clear()
    return fake, folder


def sync(fake, folder, **kw):
    lines = []
    actions = schedules.sync(fake, folder, POOL, log=lines.append, **kw)
    return {a.name: a.kind for a in actions}, "\n".join(lines)


def kinds(fake):
    return [c[0] for c in fake.mutations()]


def test_first_sync_creates_then_second_sync_does_nothing(setup):
    fake, folder = setup
    plan, out = sync(fake, folder)
    assert plan == {"nightly": "create", "weekly": "create"}
    assert kinds(fake) == ["create_recurring_run", "create_recurring_run"]
    runs = {r.display_name: r for r in fake.recurring.values()}
    nightly, weekly = runs["nightly"], runs["weekly"]
    assert nightly.trigger.cron_schedule.cron == "0 0 2 * * *"  # KFP's 6-field cron
    assert nightly.status == "ENABLED" and weekly.status == "DISABLED"
    assert nightly.service_account == "llmneo-pipeline" and nightly.no_catchup is True
    params = nightly.runtime_config.parameters
    assert params["preset"] == "tiny" and params["overrides"] == ["distill.max_steps=8"]
    assert params["eval_gpus"] == "0" and params["distill_gpus"] == "6"  # schedule over pool file
    assert params["gpu_node_selector"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}
    assert nightly.description.startswith(schedules.MARKER + " nightly fingerprint=")
    (version,) = [v for v in fake.versions[nightly.pipeline_version_reference.pipeline_id] if v.display_name == "0.1.0"]
    assert nightly.pipeline_version_reference.pipeline_version_id == version.pipeline_version_id
    assert "create nightly new (0 0 2 * * *, version 0.1.0)" in re.sub(" +", " ", out)  # a table row

    fake.calls.clear()
    plan, _ = sync(fake, folder)
    assert plan == {"nightly": "keep", "weekly": "keep"} and kinds(fake) == []


def test_changed_file_replaces_new_first_then_pause_and_delete_old(setup):
    fake, folder = setup
    sync(fake, folder)
    (old_id,) = [k for k, r in fake.recurring.items() if r.display_name == "nightly"]
    write(folder, "nightly", cron="0 3 * * *", overrides=["distill.max_steps=8"], parameters={"eval_gpus": 0})
    fake.calls.clear()
    plan, _ = sync(fake, folder)
    assert plan == {"nightly": "replace", "weekly": "keep"}
    assert [(c[0], c[-1]) for c in fake.mutations()][1:] == [("disable_recurring_run", old_id),
                                                             ("delete_recurring_run", old_id)]
    assert fake.mutations()[0][0] == "create_recurring_run"  # the new one exists before the old one goes
    (new,) = [r for r in fake.recurring.values() if r.display_name == "nightly"]
    assert new.recurring_run_id != old_id and new.trigger.cron_schedule.cron == "0 0 3 * * *"


def test_pool_or_version_change_is_a_replace(setup):
    fake, folder = setup
    sync(fake, folder)
    kfp_client.upload(fake, version="0.2.0")
    write(folder, "nightly", overrides=["distill.max_steps=8"], parameters={"eval_gpus": 0}, pipeline_version="latest")
    plan, _ = sync(fake, folder)
    assert plan["nightly"] == "replace"
    (new,) = [r for r in fake.recurring.values() if r.display_name == "nightly"]
    assert new.pipeline_version_reference.pipeline_version_id == fake.versions[new.pipeline_version_reference.pipeline_id][-1].pipeline_version_id


def test_removed_file_is_paused_and_deleted_and_foreign_runs_are_left_alone(setup):
    fake, folder = setup
    sync(fake, folder)
    pid = next(iter(fake.pipelines.values())).pipeline_id
    foreign = fake.create_recurring_run("exp-llmneo", "someone-elses", description="hand made", cron_expression="0 0 1 * * *",
                                        pipeline_id=pid, version_id=fake.versions[pid][0].pipeline_version_id)
    (weekly_id,) = [k for k, r in fake.recurring.items() if r.display_name == "weekly"]
    (folder / "weekly.yaml").unlink()
    fake.calls.clear()
    plan, _ = sync(fake, folder)
    assert plan == {"nightly": "keep", "weekly": "delete"}
    assert fake.mutations() == [("disable_recurring_run", weekly_id), ("delete_recurring_run", weekly_id)]
    assert foreign.recurring_run_id in fake.recurring


def test_dry_run_prints_the_plan_and_changes_nothing(setup):
    fake, folder = setup
    plan, out = sync(fake, folder, dry_run=True)
    assert plan == {"nightly": "create", "weekly": "create"}
    assert kinds(fake) == [] and fake.recurring == {}
    assert "dry run: nothing changed" in out and "nightly" in out and "weekly" in out


def test_paused_by_hand_is_drift_and_interrupted_replace_is_cleaned(setup):
    fake, folder = setup
    sync(fake, folder)
    (nid,) = [k for k, r in fake.recurring.items() if r.display_name == "nightly"]
    fake.recurring[nid].status = "DISABLED"  # someone paused it in the UI; Git says enabled
    plan, _ = sync(fake, folder)
    assert plan["nightly"] == "replace"
    assert [r.status for r in fake.recurring.values() if r.display_name == "nightly"] == ["ENABLED"]
    # an interrupted replace leaves two owned runs of one schedule: the extra one goes
    (keep,) = [r for r in fake.recurring.values() if r.display_name == "nightly"]
    dup = fake.create_recurring_run("exp-llmneo", "nightly", description=keep.description, cron_expression="0 0 2 * * *",
                                    params=keep.runtime_config.parameters,
                                    pipeline_id=keep.pipeline_version_reference.pipeline_id,
                                    version_id=keep.pipeline_version_reference.pipeline_version_id)
    plan, _ = sync(fake, folder)
    assert plan["nightly"] == "delete-extra"
    assert [r.recurring_run_id for r in fake.recurring.values() if r.display_name == "nightly"] == [keep.recurring_run_id]
    assert dup.recurring_run_id not in fake.recurring


@pytest.mark.parametrize("fields, message", [
    ({"cron": "every day"}, r"bad.yaml: cron: expected 5 fields"),
    ({"crn": "0 1 * * *"}, r"bad.yaml: crn: unknown key"),
    ({"name": "Bad_Name"}, r"bad.yaml: name: lowercase letters"),
    ({"overrides": ["distill.alpha=7"]}, r"bad.yaml: distill.alpha: must be <= 1.0"),
    ({"preset": "nope"}, r"bad.yaml: preset: unknown preset 'nope'"),
    ({"parameters": {"gpus": 2}}, r"bad.yaml: parameter gpus: not a pipeline parameter"),
    ({"name": "nightly"}, r"nightly.yaml: name: 'nightly' is also used by .*bad.yaml"),
    # a scheduled run registers inside a pod: a folder there is lost with it (registry must be s3://)
    ({"parameters": {}}, r"bad.yaml: registry.uri: 'runs/registry' would be a folder inside the register step's pod"),
])
def test_invalid_files_fail_before_any_kfp_call(setup, fields, message):
    fake, folder = setup
    data = {"name": "bad", "cron": "0 1 * * *", "preset": "tiny", "parameters": {"registry_uri": "s3://models/r"}, **fields}
    (folder / "bad.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match=message):
        sync(fake, folder)
    assert fake.calls == []


def test_unknown_version_names_the_upload_command(setup):
    fake, folder = setup
    write(folder, "nightly", pipeline_version="7.7.7")
    with pytest.raises(UserError, match=r"no version 7.7.7: run `llmneo upload --version 7.7.7`"):
        sync(fake, folder)
    assert kinds(fake) == []


def test_shipped_schedules_are_valid():
    """k8s/schedules/*.yaml: the reconciler's checks, with each overlay's pool file; every preset they
    name is shipped (smollm2-demo, llama3.1-8b_to_3.2-1b)."""
    pools = sorted((REPO / "k8s" / "overlays").glob("*/pool.yaml"))
    shipped = sorted(p for p in (REPO / "k8s" / "schedules").glob("*.yaml") if p.name != "kustomization.yaml")
    listed = yaml.safe_load((REPO / "k8s" / "schedules" / "kustomization.yaml").read_text())
    assert sorted(listed["configMapGenerator"][0]["files"]) == [p.name for p in shipped]  # all reach the CronJob
    checked = 0
    for path in shipped:
        preset = yaml.safe_load(path.read_text())["preset"]
        assert preset in preset_names(), f"{path.name}: preset {preset} is not shipped in configs/"
        for pool in pools:
            s = schedules.load_schedule(path, kfp_client.read_pool(pool))
            assert len(s.cron.split()) == 6
            checked += 1
    assert checked == len(shipped) * len(pools) >= 2 * len(pools)


def test_cli_dry_run_validation_error_is_one_line(tmp_path):
    (tmp_path / "x.yaml").write_text("name: x\ncron: '61 2 * *'\npreset: tiny\n")
    proc = subprocess.run([sys.executable, "-m", "llmneo_pipelines.cli", "schedule", "sync", "--dir", str(tmp_path),
                           "--dry-run", "--host", "http://127.0.0.1:9"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {tmp_path / 'x.yaml'}: cron: expected 5 fields like '0 2 * * *', got '61 2 * *'"


def test_cli_sync_with_fake_client(setup, monkeypatch, capsys):
    from llmneo_pipelines.cli import main

    fake, folder = setup
    monkeypatch.setattr(kfp_client, "connect", lambda host, namespace=None: fake)
    assert main(["schedule", "sync", "--host", "http://kfp", "--dir", str(folder), "--pool-file", str(POOL),
                 "--dry-run"]) == 0
    assert "dry run" in capsys.readouterr().out and kinds(fake) == []
    assert main(["schedule", "sync", "--host", "http://kfp", "--dir", str(folder), "--pool-file", str(POOL)]) == 0
    assert "2 create" in capsys.readouterr().out and len(fake.recurring) == 2


def test_server_errors_are_one_line(setup, monkeypatch):
    import kfp_server_api

    fake, folder = setup
    err = kfp_server_api.ApiException(status=403, reason="Forbidden")
    err.body = '{"error": "User system:serviceaccount:llmneo:llmneo-scheduler is not authorized"}'

    def forbidden(**kwargs):
        raise err

    monkeypatch.setattr(fake, "create_recurring_run", forbidden)
    with pytest.raises(UserError, match=r"^create recurring run nightly: HTTP 403 User system:serviceaccount:llmneo"):
        sync(fake, folder)
