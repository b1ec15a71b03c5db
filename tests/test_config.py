import pytest

from llmneo.config import (
    apply_overrides,
    config_from_dict,
    describe_fields,
    dump_yaml,
    load_config,
    preset_names,
)
from llmneo.errors import ConfigError


def test_every_preset_validates():
    names = preset_names()
    assert {"tiny", "smollm2-demo"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name


def test_overrides_typed():
    cfg = load_config("tiny", ["distill.alpha=0.9", "distill.max_steps=7", "data.dedup=false",
                               "registry.aliases=latest,production", "teacher.tiny.num_layers=3"])
    assert cfg.distill.alpha == 0.9 and isinstance(cfg.distill.alpha, float)
    assert cfg.distill.max_steps == 7
    assert cfg.data.dedup is False
    assert cfg.registry.aliases == ["latest", "production"]
    assert cfg.teacher.tiny.num_layers == 3
    assert cfg.teacher.tiny.seed == 1  # untouched keys of a nested section keep the preset's values


def test_int_accepted_for_float():
    assert load_config("tiny", ["distill.alpha=1"]).distill.alpha == 1.0


@pytest.mark.parametrize("override, message", [
    (["distill.alpah=0.5"], "distill.alpah: unknown key (did you mean distill.alpha?)"),
    (["distill.alpha=1.5"], "distill.alpha: must be <= 1.0, got 1.5"),
    (["distill.alpha=abc"], "distill.alpha: must be a number, got 'abc'"),
    (["distill.max_steps=-1"], "distill.max_steps: must be >= 0, got -1"),
    (["distill.max_steps=0"], "distill.max_steps: set distill.max_steps or distill.epochs (both are 0)"),
    (["distill.epochs=1", "distill.max_steps=3"], "set either distill.max_steps (3) or distill.epochs (1), not both"),
    (["distill.max_steps=2.5"], "distill.max_steps: must be an integer, got 2.5"),
    (["distill.method=dpo"], "distill.method: must be one of 'sft', 'lora', 'kd', 'neo', got 'dpo'"),
    (["data.dedup=maybe"], "data.dedup: must be true or false, got 'maybe'"),
    (["nosection.x=1"], "nosection: unknown key"),
    (["distill.temperature=0"], "distill.temperature: must be > 0.0, got 0.0"),
    (["distill.lr=1e38"], "distill.lr: must be <= 1.0, got 1e+38"),  # was an AdamW traceback
    (["compare.lr_lora=5"], "compare.lr_lora: must be <= 1.0, got 5"),
    (["alpha"], "expected key=value"),
    (["distill.global_batch_size=7"], "distill.global_batch_size: must be a multiple of"),
])
def test_errors_are_one_line_and_name_the_field(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", override)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_exponent_without_a_dot_is_a_number(tmp_path):
    """YAML 1.1 reads 1e-4 (no dot) as a string; a learning rate written that way is still a float."""
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ndistill: {lr: 1e-4}\ncompare: {lr_sft: 3E-5}\n")
    cfg = load_config(str(path), ["compare.lr_kd=5e-6"])
    assert (cfg.distill.lr, cfg.compare.lr_sft, cfg.compare.lr_kd) == (1e-4, 3e-5, 5e-6)
    with pytest.raises(ConfigError, match="compare.lr_lora: must be a number, got '1e-4x'"):
        load_config("tiny", ["compare.lr_lora=1e-4x"])


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; known: .*tiny"):
        load_config("nope")


def test_preset_from_yaml_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ndistill: {alpha: 0.25}\n")
    cfg = load_config(str(path))
    assert cfg.name == "mine" and cfg.distill.alpha == 0.25


def test_round_trip_and_hash_stable():
    cfg = load_config("tiny")
    import yaml

    again = config_from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg and again.hash() == cfg.hash()
    assert load_config("tiny", ["distill.alpha=0.6"]).hash() != cfg.hash()


def test_fingerprint_leaves_out_the_fields_tagged_mechanics():
    from llmneo.config import result_fields

    cfg = load_config("tiny")
    logged = load_config("tiny", ["distill.log_every=9"])
    assert logged.hash() != cfg.hash()  # lineage: exactly what ran
    assert logged.fingerprint() == cfg.fingerprint() != load_config("tiny", ["distill.alpha=0.6"]).fingerprint()
    assert cfg.fingerprint(extra={"dataset_hash": "a"}) != cfg.fingerprint(extra={"dataset_hash": "b"})
    assert cfg.fingerprint(("teacher",)) == load_config("tiny", ["distill.alpha=0.6"]).fingerprint(("teacher",))
    assert "log_every" not in result_fields(cfg.distill) and "alpha" in result_fields(cfg.distill)
    assert "tiny" in result_fields(cfg.teacher)  # nested sections are kept (filtered likewise)


def test_apply_overrides_does_not_mutate():
    base = {"distill": {"alpha": 0.5}}
    apply_overrides(base, ["distill.alpha=0.1"])
    assert base == {"distill": {"alpha": 0.5}}


def test_every_key_documented_type():
    rows = describe_fields()
    keys = [r[0] for r in rows]
    assert "distill.alpha" in keys and "teacher.tiny.hidden_size" in keys
    assert len(keys) == len(set(keys))


# ---------------------------------------------------------------------------- training length


@pytest.mark.parametrize("overrides, max_steps, epochs", [
    ([], 30, 0.0),                                             # the preset's max_steps
    (["distill.epochs=2"], 0, 2.0),                            # an override of one clears the other
    (["distill.max_steps=0", "distill.epochs=0.5"], 0, 0.5),
    (["distill.epochs=2", "distill.max_steps=12"], None, None),  # both in one layer: an error
])
def test_max_steps_and_epochs_are_one_choice(overrides, max_steps, epochs):
    if max_steps is None:
        with pytest.raises(ConfigError, match="not both"):
            load_config("smollm2-demo", overrides)
        return
    d = load_config("smollm2-demo", overrides).distill
    assert (d.max_steps, d.epochs) == (max_steps, epochs)


def test_a_preset_with_epochs_clears_the_default_max_steps(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("distill: {epochs: 1.5}\n")
    d = load_config(str(path)).distill
    assert (d.max_steps, d.epochs) == (0, 1.5)
    assert load_config(str(path), ["distill.max_steps=7"]).distill.epochs == 0


@pytest.mark.parametrize("max_steps, epochs, rows, steps", [
    (8, 0.0, 276, 8), (0, 1.0, 276, 18), (0, 0.5, 276, 9), (0, 10.0, 276, 173), (0, 0.01, 276, 1), (0, 1.0, 16, 1)])
def test_total_steps_from_epochs_round_up_to_whole_global_batches(max_steps, epochs, rows, steps):
    d = load_config("tiny", [f"distill.max_steps={max_steps}", f"distill.epochs={epochs}",
                             "distill.global_batch_size=16", "distill.micro_batch_size=2"]).distill
    assert d.total_steps(rows) == steps


def test_length_line_says_how_many_epochs_a_run_is():
    d = load_config("tiny", ["distill.max_steps=8", "distill.global_batch_size=16"]).distill
    assert d.length_line(276) == "8 steps × 16 sequences = 0.46 epochs of 276 train rows"


def test_the_resolved_config_of_a_component_follows_the_same_rule():
    """components/params.py resolves preset + overrides in the pod through the same function."""
    from llmneo_components.params import load_run_config

    cfg = load_run_config("smollm2-demo", ["distill.epochs=1"])
    assert (cfg.distill.max_steps, cfg.distill.epochs) == (0, 1.0)


def test_preset_extends_a_shipped_preset_and_a_relative_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mid.yaml").write_text("base: smollm2-demo\nname: mid\ndistill: {max_steps: 5}\n")
    (tmp_path / "sub" / "top.yaml").write_text("base: mid.yaml\nname: top\ndistill: {alpha: 0.25}\n"
                                              "eval: {lm_eval_tasks: [llmneo_mc]}\n")
    demo = load_config("smollm2-demo")
    cfg = load_config(str(tmp_path / "sub" / "top.yaml"), ["distill.lr=1e-4"])
    assert (cfg.name, cfg.distill.alpha, cfg.distill.max_steps, cfg.distill.lr) == ("top", 0.25, 5, 1e-4)
    # everything else comes from smollm2-demo, section by section; a list replaces the base's list
    assert cfg.distill.lora_rank == demo.distill.lora_rank == 64
    assert cfg.student.prune_layers == demo.student.prune_layers
    assert cfg.eval.lm_eval_tasks == ["llmneo_mc"] and cfg.eval.lm_eval_models == demo.eval.lm_eval_models


def test_preset_base_cycle_and_missing_base_are_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    (tmp_path / "self.yaml").write_text(f"base: {tmp_path / 'self.yaml'}\n")
    (tmp_path / "lost.yaml").write_text("base: nowhere.yaml\n")
    (tmp_path / "typo.yaml").write_text("base: smolm2-demo\n")
    with pytest.raises(ConfigError, match=r"base: cycle a.yaml -> b.yaml -> a.yaml"):
        load_config(str(tmp_path / "a.yaml"))
    with pytest.raises(ConfigError, match=r"base: cycle self.yaml -> self.yaml"):
        load_config(str(tmp_path / "self.yaml"))
    with pytest.raises(ConfigError, match="preset nowhere.yaml: file does not exist"):
        load_config(str(tmp_path / "lost.yaml"))
    with pytest.raises(ConfigError, match="unknown preset 'smolm2-demo'"):
        load_config(str(tmp_path / "typo.yaml"))


def test_missing_preset_file_says_so():
    with pytest.raises(ConfigError, match=r"^preset /nope.yaml: file does not exist"):
        load_config("/nope.yaml")
    with pytest.raises(ConfigError, match=r"^preset configs/nope.yml: file does not exist"):
        load_config("configs/nope.yml")


@pytest.mark.parametrize("override, hint", [
    ("alpha=0.9", "alpha: unknown key (did you mean distill.alpha?)"),
    ("lora_rnk=8", "lora_rnk: unknown key (did you mean distill.lora_rank?)"),
    ("distill.alpah=0.9", "distill.alpah: unknown key (did you mean distill.alpha?)"),
])
def test_bare_or_misspelt_key_suggests_the_full_key(override, hint):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [override])
    assert str(info.value) == hint


def test_registry_from_environment_between_preset_and_override(monkeypatch):
    """registry.uri: an explicit override, else $LLMNEO_REGISTRY, else the preset's value."""
    monkeypatch.delenv("LLMNEO_REGISTRY", raising=False)
    assert load_config("tiny").registry.uri == "runs/registry"
    monkeypatch.setenv("LLMNEO_REGISTRY", "s3://models/llmneo")
    assert load_config("tiny").registry.uri == "s3://models/llmneo"
    assert load_config("tiny", ["registry.uri=/srv/registry"]).registry.uri == "/srv/registry"
    monkeypatch.setenv("LLMNEO_REGISTRY", "")
    assert load_config("tiny").registry.uri == "runs/registry"


def test_a_preset_extending_another_chooses_its_own_training_length(tmp_path):
    """smollm2-demo sets max_steps; a preset extending it with epochs trains epochs (one choice)."""
    (tmp_path / "mine.yaml").write_text("base: smollm2-demo\ndistill: {epochs: 2}\n")
    d = load_config(str(tmp_path / "mine.yaml")).distill
    assert (d.max_steps, d.epochs) == (0, 2.0)
