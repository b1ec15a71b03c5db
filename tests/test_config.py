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
