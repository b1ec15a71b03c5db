"""Teacher loading and the base student: sources (tiny, folder, hub cache, S3, SmolLM2), verification
errors, tokenizer mismatch, padded teacher vocabulary, depth pruning."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmneo.config import TinyModelConfig, load_config
from llmneo.errors import UserError
from llmneo.models import (
    build_tiny_llama,
    build_tiny_tokenizer,
    folder_content_hash,
    load_causal_lm,
    param_count,
    tokenizer_fingerprint,
)
from llmneo.teacher import run_teacher


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def save_tiny(path, tok, layers=2, vocab_size=None, seed=3):
    model = build_tiny_llama(TinyModelConfig(num_layers=layers, seed=seed), vocab_size or len(tok), tok.pad_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def teacher_step(tmp_path, *overrides, dataset=None):
    cfg = load_config("tiny", list(overrides))
    return run_teacher(cfg, dataset, tmp_path / "teacher", tmp_path / "student")


def same_logits(a, b, ids):
    with torch.no_grad():
        return torch.allclose(a(input_ids=ids).logits, b(input_ids=ids).logits, atol=1e-6)


IDS = torch.tensor([[1, 5, 9, 42, 7, 300, 12]])


# ---------------------------------------------------------------------------- sources


def test_tiny_teacher_and_student_cards(tiny_workspace):
    from llmneo.cards import DatasetCard, ModelCard

    dataset = DatasetCard.read(tiny_workspace / "dataset")
    for role in ("teacher", "student"):
        card = ModelCard.read(tiny_workspace / role)
        model = load_causal_lm(tiny_workspace / role)
        assert card.parameters == param_count(model) and card.dtype == "float32"
        assert card.content_hash == folder_content_hash(tiny_workspace / role)
        assert card.tokenizer_fingerprint == dataset.tokenizer_fingerprint
        assert card.layers == model.config.num_hidden_layers and card.vocab_size == 512


def test_local_folder_teacher_is_referenced_not_copied(tmp_path, tok):
    model = save_tiny(tmp_path / "mine", tok, layers=3)
    card = teacher_step(tmp_path, f"teacher.source={tmp_path / 'mine'}").teacher
    assert sorted(p.name for p in (tmp_path / "teacher").iterdir()) == ["card.json"]
    assert card.ref == str((tmp_path / "mine").resolve()) and card.source == str(tmp_path / "mine")
    assert card.parameters == param_count(model) and card.layers == 3 and card.dtype == "float32"
    assert card.content_hash == folder_content_hash(tmp_path / "mine")
    assert same_logits(load_causal_lm(tmp_path / "teacher").eval(), model.eval(), IDS)


def make_hub_cache(root, repo_id, folder, commit="0123456789abcdef0123456789abcdef01234567", ref="main"):
    """The layout huggingface_hub leaves in HF_HUB_CACHE after a download of ``repo_id``."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / ref).write_text(commit)
    return commit


def test_hub_id_with_revision_through_the_local_cache(tmp_path, tok, monkeypatch):
    from huggingface_hub import constants

    model = save_tiny(tmp_path / "src", tok, layers=3)
    commit = make_hub_cache(tmp_path / "hub", "org/tiny-teacher", tmp_path / "src")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for source in ("hf:org/tiny-teacher@main", f"hf:org/tiny-teacher@{commit}", "hf:org/tiny-teacher"):
        card = teacher_step(tmp_path, f"teacher.source={source}").teacher
        assert card.ref == f"hf:org/tiny-teacher@{commit}" and card.revision == commit
        assert card.parameters == param_count(model)
        assert same_logits(load_causal_lm(tmp_path / "teacher").eval(), model.eval(), IDS)
    with pytest.raises(UserError, match=r"teacher.source: cannot load hf:org/absent@v1 .*offline mode "
                                        r"\(HF_HUB_OFFLINE=1\) and not in the local Hugging Face cache"):
        teacher_step(tmp_path, "teacher.source=hf:org/absent@v1")


@pytest.mark.parametrize("source, message", [
    ("hf:a/b/c", "is not a hub id"), ("hf:org/x@", "empty revision"), ("hf:@main", "is not a hub id"),
    ("meta-llama/Llama-3.1-8B", "no config.json\\); for a Hugging Face model write hf:meta-llama/Llama-3.1-8B"),
])
def test_bad_model_sources_are_clear(tmp_path, source, message):
    with pytest.raises(UserError, match=message):
        teacher_step(tmp_path, f"teacher.source={source}")


@pytest.mark.integration
def test_s3_teacher_is_downloaded_verified_and_cached(s3_bucket, tmp_path, tok, monkeypatch):
    from llmneo.models import s3_model_dir
    from llmneo.storage.s3 import client

    monkeypatch.setenv("LLMNEO_CACHE", str(tmp_path / "cache"))
    model = save_tiny(tmp_path / "src", tok, layers=3)
    s3 = client()
    for path in (tmp_path / "src").iterdir():
        s3.put_object(Bucket=s3_bucket, Key=f"models/tiny/{path.name}", Body=path.read_bytes(),
                      ChecksumAlgorithm="SHA256")
    uri = f"s3://{s3_bucket}/models/tiny"
    card = teacher_step(tmp_path, f"teacher.source={uri}").teacher
    assert card.ref == uri and card.content_hash == folder_content_hash(tmp_path / "src")
    assert card.parameters == param_count(model)
    assert same_logits(load_causal_lm(tmp_path / "teacher").eval(), model.eval(), IDS)
    cached = s3_model_dir(uri)
    assert cached.parent == tmp_path / "cache" / "s3" and s3_model_dir(uri) == cached  # reused
    s3.put_object(Bucket=s3_bucket, Key="models/tiny/README.md", Body=b"changed")
    assert s3_model_dir(uri) != cached  # a changed listing is downloaded again
    with pytest.raises(UserError, match=r"holds no config.json"):
        s3_model_dir(f"s3://{s3_bucket}/models/none")


# ---------------------------------------------------------------------------- verification errors


def test_broken_config_missing_weights_and_wrong_parameter_count(tmp_path, tok):
    save_tiny(tmp_path / "m", tok, layers=2)
    cfg_path = tmp_path / "m" / "config.json"
    good = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**good, "num_hidden_layers": 4}))
    with pytest.raises(UserError, match=r"the safetensors files hold [\d,]+ weights but the config describes "
                                        r"[\d,]+ parameters"):
        teacher_step(tmp_path, f"teacher.source={tmp_path / 'm'}")
    cfg_path.write_text("{")
    with pytest.raises(UserError, match=r"teacher.source: the model config at .* does not load"):
        teacher_step(tmp_path, f"teacher.source={tmp_path / 'm'}")
    cfg_path.write_text(json.dumps(good))
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"no \*.safetensors weights"):
        teacher_step(tmp_path, f"teacher.source={tmp_path / 'm'}")


def test_tokenizer_mismatch_lists_the_first_differences(tmp_path, tok):
    other = build_tiny_tokenizer()
    other.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    save_tiny(tmp_path / "student", other, vocab_size=len(other))
    with pytest.raises(UserError) as err:
        teacher_step(tmp_path, f"student.source={tmp_path / 'student'}")
    msg = str(err.value)
    assert msg.startswith("teacher and student tokenizers differ: vocabulary size 512 vs 513; "
                          "token '<|tool|>' only in student")
    # same size, different special tokens
    swapped = build_tiny_tokenizer()
    swapped.eos_token = "<|endoftext|>"
    save_tiny(tmp_path / "student2", swapped)
    with pytest.raises(UserError, match=r"special token eos_token: '<\|im_end\|>' vs '<\|endoftext\|>'"):
        teacher_step(tmp_path / "b", f"student.source={tmp_path / 'student2'}")


def test_dataset_tokenized_with_another_tokenizer_is_refused(tmp_path, tiny_workspace):
    from llmneo.cards import DatasetCard

    card = DatasetCard.read(tiny_workspace / "dataset")
    card.tokenizer_fingerprint = "0000"
    card.write(tmp_path / "ds")
    with pytest.raises(UserError, match=r"was tokenized with tokenizer 0000, the student uses .*re-run prep"):
        teacher_step(tmp_path, dataset=tmp_path / "ds")


def test_padded_teacher_vocabulary_is_accepted_and_recorded(tmp_path, tok):
    save_tiny(tmp_path / "padded", tok, layers=2, vocab_size=576)  # 512 tokens, embedding padded to 576
    card = teacher_step(tmp_path, f"teacher.source={tmp_path / 'padded'}").teacher
    assert card.vocab_size == 576 and card.tokenizer_size == 512
    assert card.vocab_slice["teacher_vocab_size"] == 576 and card.vocab_slice["student_vocab_size"] == 512


def test_teacher_vocabulary_smaller_than_the_students_is_refused(tmp_path, tok):
    save_tiny(tmp_path / "student", tok, vocab_size=576)
    with pytest.raises(UserError, match=r"teacher vocabulary \(512\) is smaller than the student's \(576\)"):
        teacher_step(tmp_path, f"student.source={tmp_path / 'student'}")


# ---------------------------------------------------------------------------- pruning


def test_pruning_keeps_chosen_layers_and_tokenizer_and_reloads(tmp_path):
    result = teacher_step(tmp_path, "student.source=prune", "student.prune_layers=[0, -1]")
    card = result.student
    assert card.kept_layers == [0, 3] and card.layers == 2 and card.pruned_from == "tiny"
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher").eval()
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()  # a plain HF folder
    assert student.config.num_hidden_layers == 2
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for new, old in enumerate([0, 3]):
        for name, value in s_sd.items():
            if name.startswith(f"model.layers.{new}."):
                assert torch.equal(value, t_sd[name.replace(f"layers.{new}.", f"layers.{old}.")]), name
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s_sd[name], t_sd[name])
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / "student")) == \
        tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / "teacher")) == card.tokenizer_fingerprint
    # the reloaded student computes what the teacher's layers 0 and 3 compute
    from llmneo.teacher import prune_layers

    in_memory = prune_layers(AutoModelForCausalLM.from_pretrained(tmp_path / "teacher").eval(), [0, 3])
    assert same_logits(student, in_memory, IDS)


def test_keep_every_k(tmp_path):
    card = teacher_step(tmp_path, "student.source=prune", "student.prune_keep_every=3").student
    assert card.kept_layers == [0, 3]


@pytest.mark.parametrize("layers, message", [
    ("[0, 9]", r"\[9\] out of range for a teacher with 4 layers"), ("[1, 1]", "repeated layers"),
    ("[2, 0]", "must be ascending"), ("[-5]", r"\[-5\] out of range"),
])
def test_bad_prune_layer_lists(tmp_path, layers, message):
    with pytest.raises(UserError, match=message):
        teacher_step(tmp_path, "student.source=prune", f"student.prune_layers={layers}")


@pytest.mark.integration
def test_smollm2_teacher_and_pruned_student(tmp_path):
    """The embedded default's shape: the packaged SmolLM2 (30 layers) pruned by an explicit layer list."""
    keep = [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29]
    result = teacher_step(tmp_path, "teacher.source=smollm2", "student.source=prune",
                          f"student.prune_layers={json.dumps(keep)}")
    teacher, student = result.teacher, result.student
    assert teacher.ref == "smollm2" and teacher.layers == 30 and teacher.dtype == "bfloat16"
    assert teacher.parameters == 134_515_008 and teacher.vocab_size == 49152
    assert student.kept_layers == keep and student.layers == len(keep)
    assert student.tokenizer_fingerprint == teacher.tokenizer_fingerprint
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "student", dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == len(keep) and student.parameters == param_count(model)
    tok = AutoTokenizer.from_pretrained(tmp_path / "student")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=False)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == 49152
    full = load_causal_lm(tmp_path / "teacher", dtype=torch.float32)
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, full.model.layers[3].mlp.up_proj.weight)
    assert torch.equal(model.model.layers[-1].self_attn.q_proj.weight, full.model.layers[29].self_attn.q_proj.weight)


def test_sharded_weights_are_counted_once_and_a_missing_shard_is_named(tmp_path, tok):
    model = save_tiny(tmp_path / "m", tok, layers=3)
    shutil.rmtree(tmp_path / "m")
    model.save_pretrained(tmp_path / "m", max_shard_size="200KB")
    tok.save_pretrained(tmp_path / "m")
    shards = sorted((tmp_path / "m").glob("model-*.safetensors"))
    assert len(shards) > 1
    shutil.copy(shards[0], tmp_path / "m" / "consolidated.safetensors")  # a stray extra copy is ignored
    card = teacher_step(tmp_path, f"teacher.source={tmp_path / 'm'}").teacher
    assert card.parameters == param_count(model)
    shards[-1].unlink()
    with pytest.raises(UserError, match=rf"weight shard {shards[-1].name} \(named in model.safetensors.index.json\) "
                                        "is missing"):
        teacher_step(tmp_path, f"teacher.source={tmp_path / 'm'}")
