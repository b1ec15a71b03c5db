"""Bad input and environment faults: each is reproduced, and each must give one ``error:`` line
naming the field or path and the cause (exit code 2, no traceback), fail before any work, and leave
nothing behind that a later step could take for a result."""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmneo import task_index
from llmneo.cards import CARD
from llmneo.config import DataConfig, load_config, read_preset
from llmneo.data_sources import open_source
from llmneo.errors import ConfigError, UserError, environment_error, environment_faults, guarded
from llmneo.preflight import preflight

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def cli(*args: str, cwd: Path, module: str = "llmneo_pipelines.cli", env: dict | None = None,
        timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **OFFLINE, **(env or {})})


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line of a failed command (exit 2, nothing else on stderr)."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# --------------------------------------------------------------------------------------------
# data.source: empty, BOM
# --------------------------------------------------------------------------------------------


def test_empty_data_source_is_an_error_not_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "secret.json").write_text('[{"text": "a file nobody meant to train on"}]')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^data.source: empty; give builtin:NAME"):
        load_config("tiny", ["data.source="])
    with pytest.raises(UserError, match=r"^data.source: empty"), open_source(DataConfig(source=" ")):
        pass  # the reader refuses too (a DataConfig built without load_config)


def test_utf8_bom_at_the_start_of_jsonl_keeps_row_1(tmp_path):
    rows = [{"text": f"row {i}"} for i in range(1, 4)]
    raw = b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode()
    path = tmp_path / "bom.jsonl"
    path.write_bytes(raw)
    with open_source(DataConfig(source=str(path))) as source:
        got = list(source.records())
        assert [(pos, rec, err) for pos, rec, err, _ in got] == [(i, rows[i - 1], None) for i in (1, 2, 3)]
        assert source.content_hash == hashlib.sha256(raw).hexdigest()  # the file's bytes, BOM included


# --------------------------------------------------------------------------------------------
# Values checked when the configuration loads
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("eval.thresholds=acc > 3", r"eval.thresholds\[0\]: 'acc > 3' is not METRIC>=VALUE or METRIC<=VALUE"),
    ("eval.thresholds=[acc>=0.1,acc>=x]", r"eval.thresholds\[1\]: 'acc>=x' is not"),
    ("eval.thresholds=acc>=nan", r"eval.thresholds\[0\]: 'acc>=nan' is not"),
    ("registry.name=my model", r"registry.name: 'my model' must match"),
    ("registry.name=../x", r"registry.name: '../x' must match"),
    ("registry.aliases=[latest,v2]", r"registry.aliases\[1\]: 'v2' must match .* not look like a version"),
    ("data.max_length=1000000", r"data.max_length: must be <= 131072, got 1000000"),
    ("teacher.source=", r"teacher.source: empty"),
    ("eval.lm_eval_tasks=[llmneo_mc,llmneo_mcq]", r"eval.lm_eval_tasks: unknown task\(s\) llmneo_mcq; repo tasks: "
                                                  r"llmneo_mc, llmneo_val_ppl"),
    ("compare.lm_eval_tasks=llmneo_nope", r"compare.lm_eval_tasks: unknown task\(s\) llmneo_nope"),
])
def test_values_are_checked_when_the_config_loads(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


def test_thresholds_parse_into_the_gate_rules():
    from llmneo.config import parse_threshold

    assert parse_threshold(" arc_easy/acc_norm >= 0.4 ") == ("arc_easy/acc_norm", ">=", 0.4)
    assert parse_threshold("perplexity<=1e3") == ("perplexity", "<=", 1000.0)


def test_repo_task_names_never_touch_lm_eval(monkeypatch):
    """The default tasks are the repo's: no scan of lm-eval's catalogue, no lm-eval import."""
    monkeypatch.setattr(task_index, "installed_task_names", lambda: pytest.fail("lm-eval scanned"))
    cfg = load_config("tiny", ["eval.lm_eval_tasks=[llmneo_mc,llmneo_val_ppl]"])
    assert cfg.eval.lm_eval_tasks == ["llmneo_mc", "llmneo_val_ppl"]
    probe = "import sys, llmneo.config as c; c.load_config('tiny'); print('lm_eval' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **OFFLINE})
    assert out.stdout.strip() == "False", out.stderr


def test_installed_task_names_from_a_cached_scan(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMNEO_CACHE", str(tmp_path / "cache"))
    names = task_index.installed_task_names()
    assert names is not None and {"arc_easy", "arc_challenge", "piqa", "winogrande", "hellaswag", "mmlu"} <= names
    (cached,) = (tmp_path / "cache").glob("lm_eval_tasks-*.json")
    assert set(json.loads(cached.read_text())) == names
    monkeypatch.setattr(task_index, "scan_task_dir", lambda root: pytest.fail("scanned again"))
    assert task_index.installed_task_names() == names  # the second load reads the cache
    # a typo costs lm-eval's own index only for the name the scan does not know
    asked = []
    monkeypatch.setattr(task_index, "_task_manager_has", lambda missing: asked.extend(missing) or [])
    with pytest.raises(ConfigError, match=r"eval.lm_eval_tasks: unknown task\(s\) arc_eazy;"):
        load_config("tiny", ["eval.lm_eval_tasks=[arc_easy,arc_eazy,llmneo_mc]"])
    assert asked == ["arc_eazy"]


def test_task_scan_reads_quoted_keys_lists_and_templates(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "t.yaml").write_text('"task": "quoted_task"\ninclude: _default_yaml\n')
    (tmp_path / "a" / "_default_yaml").write_text("tag:\n  - tag_one\n  - tag_two\ndataset_path: x\n")
    (tmp_path / "a" / "g.yaml").write_text("group: grp\ntask:\n  - sub_a\n  - sub_b\naggregate_metric_list: []\n")
    (tmp_path / "a" / "i.yaml").write_text("task: inline\ntag: [t1, 't2']\n")
    (tmp_path / "a" / "README.md").write_text("task: not_a_task\n")
    assert task_index.scan_task_dir(tmp_path) == {"quoted_task", "tag_one", "tag_two", "grp", "sub_a", "sub_b",
                                                  "inline", "t1", "t2"}


def test_duplicate_yaml_keys_are_an_error(tmp_path):
    preset = tmp_path / "dup.yaml"
    preset.write_text("name: dup\ndistill:\n  alpha: 0.5\n  max_steps: 2\n  alpha: 0.9\n")
    with pytest.raises(ConfigError, match=r"preset .*dup.yaml: not valid YAML \(duplicate key 'alpha' "
                                          r"\(line 5, first on line 3\) at line 5\)"):
        read_preset(str(preset))
    preset.write_text("name: dup\ndistill: {alpha: 0.5}\nname: again\n")
    with pytest.raises(ConfigError, match="duplicate key 'name'"):
        load_config(str(preset))
    with pytest.raises(UserError, match="duplicate key"):  # the resolved config a component receives
        from llmneo_components.params import _resolve
        _resolve("tiny", [], "name: a\nname: b\n", [])


def test_non_utf8_preset_is_one_line(tmp_path):
    preset = tmp_path / "latin1.yaml"
    preset.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"preset .*latin1.yaml: not UTF-8 text \(byte 0xe9 on line 1\); "
                                          r"save the file as UTF-8"):
        load_config(str(preset))
    preset.write_bytes(b"\xef\xbb\xbfname: bom\n")  # a UTF-8 BOM is fine
    assert load_config(str(preset)).name == "bom"


# --------------------------------------------------------------------------------------------
# Preflight: every input exists before the first step
# --------------------------------------------------------------------------------------------


def test_preflight_names_the_first_missing_input(tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    model = tmp_path / "m"
    model.mkdir()
    preflight(load_config("tiny", [f"data.source={data}"]))
    with pytest.raises(UserError, match=r"^data.source: '/nope.jsonl' does not exist$"):
        preflight(load_config("tiny", ["data.source=/nope.jsonl"]))
    with pytest.raises(UserError, match=r"^data.source: unknown builtin dataset 'nope'"):
        preflight(load_config("tiny", ["data.source=builtin:nope"]))
    with pytest.raises(UserError, match=r"^teacher.source: '/no/model' is not a model folder$"):
        preflight(load_config("tiny", ["teacher.source=/no/model"]))
    with pytest.raises(UserError, match=r"^student.source: .* is not a Hugging Face model folder \(no config.json\)"):
        preflight(load_config("tiny", [f"student.source={model}"]))
    with pytest.raises(UserError, match=r"^teacher.source: 'org/name' is not a model folder; for a Hugging Face "
                                        r"model write hf:org/name"):
        preflight(load_config("tiny", ["teacher.source=org/name"]))
    with pytest.raises(UserError, match=r"^data.source: s3://Bad_Bucket!/x: 'Bad_Bucket!' is not a valid S3 bucket"):
        preflight(load_config("tiny", ["data.source=s3://Bad_Bucket!/x"]))
    with pytest.raises(UserError, match=r"^registry.uri: s3://ab/r: 'ab' is not a valid S3 bucket"):
        preflight(load_config("tiny", ["registry.uri=s3://ab/r"]))
    (tmp_path / "reg").write_text("")
    with pytest.raises(UserError, match=r"^registry.uri: .*reg is a file, not a folder"):
        preflight(load_config("tiny", [f"registry.uri={tmp_path / 'reg'}"]))
    # hub ids are not looked up; a submitted run's local paths are the pods' paths
    preflight(load_config("tiny", ["data.source=hf:org/data", "teacher.source=hf:org/model@main"]))
    preflight(load_config("tiny", ["data.source=/in/the/image.jsonl", "teacher.source=/models/t"]), local=False)


def test_preflight_unreadable_input(tmp_path, monkeypatch):
    """Permission denied. Tests run as root here, which bypasses file modes: chmod 000 is tried
    first, and where it cannot deny (root) the open is made to fail with EACCES instead."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    data.chmod(0)
    if os.access(data, os.R_OK):  # root: simulate what chmod does for everyone else
        real_open = open

        def denied(path, *args, **kwargs):
            if Path(path) == data:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(UserError, match=rf"^data.source: {data}: cannot read \(Permission denied\)$"):
        preflight(load_config("tiny", [f"data.source={data}"]))


def test_submit_checks_uris_before_connecting():
    from llmneo_pipelines.kfp_client import run_parameters

    with pytest.raises(UserError, match=r"^data.source: s3://Bad_Bucket!/x: 'Bad_Bucket!' is not a valid S3 bucket"):
        run_parameters("tiny", ["data.source=s3://Bad_Bucket!/x", "registry.uri=s3://models/registry"])
    # a pod path: not checked here
    args = run_parameters("tiny", ["data.source=/data/in-the-image.jsonl", "registry.uri=s3://models/registry"])
    assert args["overrides"] == ["data.source=/data/in-the-image.jsonl", "registry.uri=s3://models/registry"]


def test_llmneo_run_with_a_missing_input_fails_in_seconds(tmp_path):
    """Before the preflight this ran the prep step three times with back-off (1 min 45 s)."""
    t0 = time.time()
    proc = cli("run", "--preset", "tiny", "data.source=/nope.jsonl", "--pipeline-root", str(tmp_path / "kfp"),
               cwd=tmp_path)
    elapsed = time.time() - t0
    assert one_error_line(proc) == "error: data.source: '/nope.jsonl' does not exist"
    assert elapsed < 30
    assert not (tmp_path / "kfp").exists() or not any((tmp_path / "kfp").iterdir())  # no step ran


# --------------------------------------------------------------------------------------------
# Environment faults: one line naming the path and the cause
# --------------------------------------------------------------------------------------------


def test_environment_oserrors_map_to_one_line(capsys):
    def fail(number, filename=None):
        def fn():
            raise OSError(number, os.strerror(number), filename)
        return fn

    for number, cause in ((errno.ENOSPC, "disk full"), (errno.EACCES, "permission denied"),
                          (errno.ENAMETOOLONG, "file name too long"), (errno.EROFS, "read-only file system")):
        with pytest.raises(SystemExit) as e:
            guarded(fail(number, "/out/model.safetensors"))
        assert e.value.code == 2
        assert capsys.readouterr().err == f"error: /out/model.safetensors: {cause} ({os.strerror(number)})\n"
    with pytest.raises(ConnectionResetError):  # not an environment fault: a bug or the network, traceback kept
        guarded(fail(errno.ECONNRESET))
    # wrapped by libraries, without a file name: the step's output is named instead
    safetensors_like = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert str(environment_error(safetensors_like, "/runs/model")) == \
        "/runs/model: disk full (No space left on device)"
    pyarrow_like = OSError(28, "Error writing bytes to file. Detail: [errno 28] No space left on device")
    assert str(environment_error(pyarrow_like, "/runs/dataset")) == "/runs/dataset: disk full (No space left on device)"


def _enospc(where: str):
    raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")


def test_prep_disk_full_is_one_line_and_leaves_no_card(tmp_path, monkeypatch, capsys):
    from llmneo import data_output
    from llmneo.steps import prepare_dataset

    out = tmp_path / "dataset"
    monkeypatch.setattr(data_output.ParquetRows, "_flush", lambda self: _enospc(str(self)))
    with pytest.raises(SystemExit) as e:
        guarded(prepare_dataset, load_config("tiny"), out)
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {out}: disk full (No space left on device)"
    assert not (out / CARD).exists()  # the teacher step refuses the folder


def test_prep_on_a_really_full_disk(tmp_path, capsys):
    """A real ENOSPC: a one-page tmpfs (needs mount privileges; skipped without them)."""
    from llmneo.steps import prepare_dataset

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(SystemExit) as e:
            guarded(prepare_dataset, load_config("tiny", ["data.limit=0"]), mnt / "dataset")
        assert e.value.code == 2
        err = capsys.readouterr().err.splitlines()[-1]  # after the progress bars
        assert err.startswith(f"error: {mnt}/dataset") and err.endswith("disk full (No space left on device)"), err
        assert not (mnt / "dataset" / CARD).exists()
        del e  # its traceback holds the failed writers and their open files
    finally:
        gc.collect()
        subprocess.run(["umount", str(mnt)], check=True)


def test_merge_eval_disk_full_is_one_line_and_leaves_no_card(tiny_workspace, tmp_path, monkeypatch, capsys):
    import torch
    import transformers.modeling_utils as modeling_utils
    from peft import LoraConfig, get_peft_model

    from llmneo.cards import DistillCard
    from llmneo.models import load_causal_lm
    from llmneo.steps import merge_and_evaluate

    base = load_causal_lm(tiny_workspace / "student", dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    peft_model.save_pretrained(tmp_path / "distill" / "adapter")
    DistillCard(method="neo", status="complete").write(tmp_path / "distill")

    def full(tensors, filename, metadata=None):  # what safetensors raises when the disk fills up
        Path(filename).write_bytes(b"\0" * 10)
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(modeling_utils, "safe_save_file", full)
    out = tmp_path / "model"
    with pytest.raises(SystemExit) as e:
        guarded(merge_and_evaluate, load_config("tiny", ["eval.lm_eval_tasks=[]"]), tiny_workspace / "dataset",
                tiny_workspace / "teacher", tiny_workspace / "student", tmp_path / "distill", out)
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {out}: disk full (No space left on device)"
    assert not (out / CARD).exists() and not (out / "eval.json").exists()  # register refuses the folder


def test_register_disk_full_is_one_line_and_publishes_nothing(tmp_path, monkeypatch, capsys):
    from llmneo.cards import EvalCard, weight_digests
    from llmneo.registry import open_registry
    from llmneo.steps import register_model
    from llmneo.storage.local import LocalStore

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"w" * 1000)
    (model / "config.json").write_text("{}")
    EvalCard(gate={"passed": True, "reasons": []}, weights=weight_digests(model)).write(model)
    registry = tmp_path / "registry"
    cfg = load_config("tiny", [f"registry.uri={registry}"])
    real = LocalStore.put_file

    def full(self, key, src, sha256=None, progress=None):
        if key.endswith("model.safetensors"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(self.url(key))))
        return real(self, key, src, sha256, progress)

    monkeypatch.setattr(LocalStore, "put_file", full)
    with pytest.raises(SystemExit) as e:
        guarded(register_model, cfg, model)
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("error: ") and err.endswith("model.safetensors: disk full (No space left on device)"), err
    reg = open_registry(cfg.registry)
    assert reg.versions("llmneo-student") == []  # no half-registered version, no alias moved


def test_path_too_long_is_one_line(tmp_path):
    out = tmp_path / ("x" * 300)  # a real ENAMETOOLONG: one component over NAME_MAX (255)
    proc = cli("prep", "--preset", "tiny", "--out", str(out), cwd=tmp_path)
    line = one_error_line(proc)
    assert line.endswith(": file name too long (File name too long)") and "xxxx" in line, line


def test_out_is_a_file(tmp_path):
    out = tmp_path / "dataset"
    out.write_text("keep me")
    proc = cli("prep", "--preset", "tiny", "--out", str(out), cwd=tmp_path)
    assert one_error_line(proc) == f"error: --out {out}: is a file, not a folder"
    assert out.read_text() == "keep me"
    proc = cli("prep", "--preset", "tiny", "--out", str(out / "sub"), cwd=tmp_path)
    assert one_error_line(proc) == f"error: --out {out / 'sub'}: {out} is a file, not a folder"


def test_permission_denied_on_the_output_folder(tmp_path, monkeypatch, capsys):
    """chmod 555 on the parent; as root (these tests' usual user) mkdir is made to fail with EACCES."""
    from llmneo import cli as library_cli

    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    if os.access(parent, os.W_OK):  # root ignores the mode
        real_mkdir = Path.mkdir

        def denied(self, *args, **kwargs):
            if self.parent == parent:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(SystemExit) as e:
        library_cli.main(["prep", "--preset", "tiny", "--out", str(parent / "dataset")])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        f"error: {parent / 'dataset'}: permission denied (Permission denied)"
    parent.chmod(0o755)


def test_invalid_bucket_name_fails_before_any_network_call(tmp_path):
    # an endpoint nobody listens on: any S3 call would fail with "cannot reach", not this
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    proc = cli("prep", "--preset", "tiny", "--out", str(tmp_path / "d"), "data.source=s3://Bad_Bucket!/x",
               cwd=tmp_path, env=env)
    assert one_error_line(proc).startswith("error: data.source: s3://Bad_Bucket!/x: 'Bad_Bucket!' is not a valid "
                                           "S3 bucket name")
    proc = cli("registry", "ls", "--registry", "s3://Bad_Bucket!/x", cwd=tmp_path, env=env)
    assert "'Bad_Bucket!' is not a valid S3 bucket name" in one_error_line(proc)


@pytest.mark.parametrize("module", ["llmneo.cli", "llmneo_pipelines.cli"])
def test_closed_pipe_exits_quietly(module, tmp_path):
    """`llmneo config --keys | head -1`: the reader is gone before the command writes."""
    read, write = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", module, "config", "--keys"], stdout=write,
                            stderr=subprocess.PIPE, cwd=tmp_path, env={**os.environ, **OFFLINE})
    os.close(write)
    os.close(read)
    _, err = proc.communicate(timeout=120)
    assert err == b"" and proc.returncode == 141  # 128 + SIGPIPE, as `yes | head -1` reports


def test_environment_faults_keeps_other_errors():
    with pytest.raises(ValueError, match="a bug"), environment_faults("/x"):
        raise ValueError("a bug")
