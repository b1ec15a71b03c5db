"""Merge and evaluation: merged = adapter model, chunked fidelity = full-logits reference, the repo's
lm-eval tasks score what a hand computation scores, the gate, the reports and the model card."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmneo.cards import DistillCard
from llmneo.config import load_config
from llmneo.data import collate, read_split
from llmneo.errors import UserError
from llmneo.evaluate import compare_to_base, evaluate_models, fidelity, gate, lm_eval_scores, merge
from llmneo.models import load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def adapter_run(tiny_workspace, tmp_path_factory):
    """A distill output folder with a LoRA adapter whose B is random (non-zero), like a trained one."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("adapter")
    base = load_causal_lm(tiny_workspace / "student", dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False))
    (root / "distill").mkdir()
    peft_model.save_pretrained(root / "distill" / "adapter")
    DistillCard(method="neo", status="complete").write(root / "distill")
    return root, peft_model.eval()


def test_merged_logits_equal_the_adapter_models(tiny_workspace, adapter_run):
    root, peft_model = adapter_run
    ids = torch.tensor([read_split(tiny_workspace / "dataset", "val")[0]["input_ids"]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    merge(tiny_workspace / "student", root / "distill", root / "merged")
    saved = load_causal_lm(root / "merged", dtype=torch.float32)
    with torch.no_grad():
        got = saved(input_ids=ids).logits
    base = load_causal_lm(tiny_workspace / "student", dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter does change the model
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (root / "merged" / name).is_file(), name


def test_large_models_are_sharded_and_dtype_follows_the_student(tiny_workspace, adapter_run, tmp_path):
    root, _ = adapter_run
    merge(tiny_workspace / "student", root / "distill", tmp_path / "sharded", max_shard_size="200KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / "sharded" / s).is_file() for s in shards)
    sharded = load_causal_lm(tmp_path / "sharded", dtype=torch.float32)
    single = load_causal_lm(root / "merged", dtype=torch.float32)
    for (n, a), (_, b) in zip(sharded.state_dict().items(), single.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    merge(tiny_workspace / "student", root / "distill", tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(UserError, match="eval.max_shard_size"):
        merge(tiny_workspace / "student", root / "distill", tmp_path / "bad", max_shard_size="lots")


def reference_fidelity(model, teacher, rows, pad_id):
    """Full [B, L, V] logits, one batch: the straightforward computation."""
    batch = collate(rows, pad_id)
    mask = batch["labels"][:, 1:] != -100
    targets = batch["labels"][:, 1:][mask]
    with torch.no_grad():
        s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum") / len(targets)
    agree = (s.argmax(-1) == t.argmax(-1)).float().mean()
    ppl = math.exp(F.cross_entropy(s, targets))
    return {"kl_to_teacher": float(kl), "top1_agreement": float(agree), "perplexity": ppl}


@pytest.mark.parametrize("chunk_tokens, batch_size", [(7, 3), (100000, 100)])
def test_chunked_fidelity_matches_the_full_logits_reference(tiny_workspace, chunk_tokens, batch_size):
    student = load_causal_lm(tiny_workspace / "student", dtype=torch.float32).eval()
    teacher = load_causal_lm(tiny_workspace / "teacher", dtype=torch.float32).eval()
    rows = read_split(tiny_workspace / "dataset", "val")
    pad_id = load_tokenizer(tiny_workspace / "teacher").pad_token_id
    got = fidelity({"student": student, "same": teacher}, teacher, rows, pad_id, batch_size=batch_size,
                   chunk_tokens=chunk_tokens)
    want = reference_fidelity(student, teacher, rows, pad_id)
    for key, value in want.items():
        assert got["student"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert got["same"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert got["same"]["top1_agreement"] == 1.0
    assert got["same"]["perplexity"] == pytest.approx(got["teacher"]["perplexity"], rel=1e-6)
    assert got["student"]["tokens"] == sum(sum(1 for t in r["labels"][1:] if t != -100) for r in rows)


def test_gate_applies_every_threshold():
    cfg = load_config("tiny", ["eval.max_kl_to_teacher=0.5", "eval.min_mc_accuracy=0.3",
                               "eval.min_top1_agreement=0.2", "eval.thresholds=arc_easy/acc_norm>=0.4"])
    good = {"kl_to_teacher": 0.4, "perplexity": 10.0, "top1_agreement": 0.5, "llmneo_mc/acc": 0.3,
            "arc_easy/acc_norm": 0.41}
    assert gate(cfg, good) == (True, [])
    passed, reasons = gate(cfg, {**good, "kl_to_teacher": 0.6, "llmneo_mc/acc": 0.25})
    assert not passed and reasons == ["kl_to_teacher 0.6 > eval.max_kl_to_teacher 0.5",
                                      "llmneo_mc/acc 0.25 < eval.min_mc_accuracy 0.3"]
    passed, reasons = gate(cfg, {k: v for k, v in good.items() if k != "arc_easy/acc_norm"})
    assert reasons == ["arc_easy/acc_norm not evaluated (eval.thresholds[0] needs it; check eval.lm_eval_tasks)"]
    assert not gate(cfg, {**good, "kl_to_teacher": float("nan")})[0]  # NaN never passes
    with pytest.raises(UserError, match=r"eval.thresholds\[0\]: 'acc > 3'"):
        gate(load_config("tiny", ["eval.thresholds=acc > 3"]), good)


def test_default_gate_is_relative_to_the_base_student():
    """The default gate can fail: the distilled KL must be at least eval.min_kl_reduction (10 %) below the
    base student's, and no task score may drop by more than eval.max_task_drop; every comparison is
    kept with its numbers for the report."""
    cfg = load_config("smollm2-demo")
    assert (cfg.eval.gate_vs_base, cfg.eval.min_kl_reduction, cfg.eval.max_task_drop) == (True, 0.1, 0.05)
    base = {"kl_to_teacher": 3.1281, "perplexity": 12.0, "llmneo_mc/acc": 0.36, "llmneo_mc/acc_norm": 0.40,
            "llmneo_val_ppl/word_perplexity": 30.0}
    demo = {"kl_to_teacher": 1.0591, "perplexity": 7.2, "llmneo_mc/acc": 0.47, "llmneo_mc/acc_norm": 0.38,
            "llmneo_val_ppl/word_perplexity": 40.0}  # perplexities are not task scores
    passed, reasons = gate(cfg, demo, base)
    assert (passed, reasons) == (True, [])
    assert compare_to_base(cfg, demo, base) == [
        "kl_to_teacher 1.059 <= 2.815 (base 3.128 × (1 - eval.min_kl_reduction 0.1)): pass",
        "llmneo_mc/acc 0.47 >= 0.31 (base 0.36 - eval.max_task_drop 0.05): pass",
        "llmneo_mc/acc_norm 0.38 >= 0.35 (base 0.4 - eval.max_task_drop 0.05): pass"]
    worse = {**demo, "kl_to_teacher": 2.9, "llmneo_mc/acc": 0.30}
    passed, reasons = gate(cfg, worse, base)
    assert not passed and reasons == [
        "kl_to_teacher 2.9 > 2.815 (base 3.128 × (1 - eval.min_kl_reduction 0.1))",
        "llmneo_mc/acc 0.3 < 0.31 (base 0.36 - eval.max_task_drop 0.05)"]
    assert gate(cfg, worse)[0] is True  # without the base student's metrics only the absolute rules apply
    assert gate(cfg, {**demo, "kl_to_teacher": float("nan")}, base)[0] is False
    assert gate(cfg, demo, {"perplexity": 12.0})[1] == [
        "kl_to_teacher: the base student's was not evaluated (eval.gate_vs_base needs it)"]
    off = load_config("smollm2-demo", ["eval.gate_vs_base=false"])
    assert gate(off, worse, base) == (True, []) and compare_to_base(off, worse, base) == []
    # the tiny preset (random-init models, 4 steps: the KL may get worse) turns it off on purpose
    assert load_config("tiny").eval.gate_vs_base is False


# --------------------------------------------------------------------------------------------
# lm-eval (integration: imports lm-eval and runs it)
# --------------------------------------------------------------------------------------------


def loglikelihood(model, ids: list[int], start: int) -> float:
    """Sum of log p(ids[i] | ids[:i]) for i >= start."""
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return float(sum(logp[i - 1, ids[i]] for i in range(start, len(ids))))


@pytest.mark.integration
def test_repo_tasks_score_what_a_hand_computation_scores(tiny_workspace, tmp_path):
    from llmneo.evaluate import TASK_DIR, export_val_text

    model = load_causal_lm(tiny_workspace / "teacher", dtype=torch.float32).eval()
    tok = load_tokenizer(tiny_workspace / "teacher")
    val = export_val_text(tiny_workspace / "dataset", tok, tmp_path / "val.jsonl")
    scores = lm_eval_scores(model, tok, ["llmneo_mc", "llmneo_val_ppl"], val_jsonl=val, limit=12, batch_size=8)

    # multiple choice: argmax over choices of log p(" " + choice | "Question: …\nAnswer:")
    questions = [json.loads(x) for x in (TASK_DIR / "llmneo_mc.jsonl").read_text().splitlines()][:12]
    correct = 0
    for q in questions:
        context = f"Question: {q['question']}\nAnswer:"
        n_ctx = len(tok.encode(context))
        lls = [loglikelihood(model, tok.encode(f"{context} {c}"), n_ctx) for c in q["choices"]]
        correct += int(max(range(len(lls)), key=lls.__getitem__) == q["answer"])
    assert scores["llmneo_mc"]["acc"] == pytest.approx(correct / len(questions))

    # held-out perplexity: rolling log-likelihood of each val text after the prefix token
    texts = [json.loads(x)["text"] for x in val.read_text().splitlines()][:12]
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    total_ll = sum(loglikelihood(model, [prefix, *tok.encode(t)], 1) for t in texts)
    total_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert scores["llmneo_val_ppl"]["byte_perplexity"] == pytest.approx(math.exp(-total_ll / total_bytes), rel=1e-4)
    assert scores["llmneo_val_ppl"]["bits_per_byte"] == pytest.approx(-total_ll / total_bytes / math.log(2), rel=1e-4)


def test_unknown_repo_task_is_a_clear_error(tiny_workspace):
    model = load_causal_lm(tiny_workspace / "teacher", dtype=torch.float32)
    with pytest.raises(UserError, match="eval.lm_eval_tasks: unknown task.*llmneo_nope; repo tasks: llmneo_mc"):
        lm_eval_scores(model, load_tokenizer(tiny_workspace / "teacher"), ["llmneo_mc", "llmneo_nope"])


@pytest.mark.integration
def test_standard_task_offline_is_a_clear_error(tiny_workspace):
    """Standard names resolve through lm-eval's catalogue; offline, their datasets cannot load."""
    model = load_causal_lm(tiny_workspace / "teacher", dtype=torch.float32)
    with pytest.raises(UserError, match=r"eval.lm_eval_tasks arc_easy: cannot load a task's dataset "
                                        r"\(Couldn't reach 'allenai/ai2_arc'.*offline runs use llmneo_mc"):
        lm_eval_scores(model, load_tokenizer(tiny_workspace / "teacher"), ["arc_easy"], limit=2)


@pytest.mark.integration
def test_evaluate_models_side_by_side(tiny_workspace):
    cfg = load_config("tiny", ["eval.lm_eval_tasks=[llmneo_mc]", "eval.lm_eval_limit=8"])
    result = evaluate_models({"student": tiny_workspace / "student"}, tiny_workspace / "teacher",
                             tiny_workspace / "dataset", cfg, lm_eval_on=["student", "teacher"])
    assert set(result["summary"]) == {"student", "teacher"}
    assert result["summary"]["teacher"]["kl_to_teacher"] == 0.0
    for row in result["summary"].values():
        assert 0.0 <= row["llmneo_mc/acc"] <= 1.0 and math.isfinite(row["perplexity"])


@pytest.mark.integration
def test_run_merge_eval_writes_model_reports_and_card(tiny_workspace, adapter_run, tmp_path):
    from llmneo.evaluate import run_merge_eval

    root, _ = adapter_run
    log = root / "distill" / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 3.0 / s, "ce": 5.0 / s, "kd": 1.0 / s, "lr": 1e-3,
                                       "tokens_per_s": 100.0}) + "\n" for s in (1, 2, 3)))
    cfg = load_config("tiny", ["eval.lm_eval_limit=8", "eval.min_mc_accuracy=0.99"])
    out = tmp_path / "model"
    result = run_merge_eval(cfg, tiny_workspace / "dataset", tiny_workspace / "teacher", tiny_workspace / "student",
                            root / "distill", out)
    assert set(result["fidelity"]) == {"base_student", "distilled", "teacher"}
    assert set(result["lm_eval"]) == {"base_student", "distilled", "teacher"}
    assert result["metrics"] == result["summary"]["distilled"]
    assert "llmneo_mc/acc" in result["metrics"] and "llmneo_val_ppl/bits_per_byte" in result["metrics"]
    assert not result["gate"]["passed"] and result["gate"]["reasons"][0].startswith("llmneo_mc/acc ")
    assert json.loads((out / "eval.json").read_text())["gate"] == result["gate"]
    md, page, card = (out / "report.md").read_text(), (out / "report.html").read_text(), (out / "README.md").read_text()
    assert "| distilled " in md and "Gate: FAIL" in md
    # the KFP UI cannot reach a file next to the Markdown: the curves are a data URI or absent
    assert "](data:image/png;base64," in md and "](loss_curve.png)" not in md
    assert 'src="data:image/png;base64,' in page and "<td>distilled</td>" in page
    for section in ("## Models", "## Sample generations", "## Distillation run", "tiny random-init Llama"):
        assert section in md, section
    assert len(result["samples"]) == cfg.eval.samples
    assert set(result["samples"][0]["outputs"]) == {"teacher", "base_student", "distilled"}
    assert result["models"]["teacher"]["layers"] == 4 and result["models"]["base_student"]["layers"] == 2
    assert "lm-eval" in md and "| teacher " in md
    for section in ("## Hyper-parameters", "## Evaluation", "## Lineage"):
        assert section in card, section
    for row in ("dataset hash", "teacher"):  # Markdown table rows (tabulate pads the cells)
        assert re.search(rf"^\| {row} +\|", card, re.MULTILINE), row
    assert Path(out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_merge_eval_component_outputs_reports_metrics_and_gate():
    """The compiled DAG: merge-eval hands out Markdown + HTML reports and Metrics, register is gated."""
    import yaml

    from conftest import REPO

    spec = next(yaml.safe_load_all((REPO / "pipelines" / "llm_neo.yaml").read_text()))  # doc 2: k8s platform spec
    outputs = spec["components"]["comp-merge-eval"]["outputDefinitions"]
    types = {name: a["artifactType"]["schemaTitle"] for name, a in outputs["artifacts"].items()}
    assert types == {"model": "system.Model", "metrics": "system.Metrics", "report": "system.Markdown",
                     "report_html": "system.HTML"}
    assert outputs["parameters"]["Output"]["parameterType"] == "STRING"  # "pass" / "fail"


def test_sample_prompts_split_prompt_and_reference():
    from llmneo.evaluate import sample_prompts

    rows = [{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]},   # no target: skipped
            {"input_ids": [4, 5, 6], "labels": [4, 5, 6]},            # nothing before the target: skipped
            {"input_ids": [7, 8, 9, 10, 11], "labels": [-100, -100, 9, 10, -100]},
            {"input_ids": [12, 13, 14], "labels": [-100, 13, 14]}]
    assert sample_prompts(rows, 5) == [{"prompt_ids": [7, 8], "reference_ids": [9, 10]},
                                       {"prompt_ids": [12], "reference_ids": [13, 14]}]
    assert len(sample_prompts(rows, 1)) == 1


def test_samples_are_the_greedy_continuations(tiny_workspace):
    """Every model's sample is its own argmax continuation of the val prompt, token by token."""
    from llmneo.evaluate import generate_samples, sample_prompts

    rows = read_split(tiny_workspace / "dataset", "val")
    tok = load_tokenizer(tiny_workspace / "teacher")
    models = {name: (load_causal_lm(tiny_workspace / name, dtype=torch.float32).eval(), tok)
              for name in ("teacher", "student")}
    samples = generate_samples(models, rows, 2, 6)
    prompts = sample_prompts(rows, 2)
    assert len(samples) == 2
    for sample, p in zip(samples, prompts, strict=True):
        assert sample["prompt"] == tok.decode(p["prompt_ids"], skip_special_tokens=True).strip()
        assert sample["reference"] == tok.decode(p["reference_ids"], skip_special_tokens=True).strip()
        for name, (model, _) in models.items():
            ids = list(p["prompt_ids"])
            with torch.no_grad():
                for _ in range(6):
                    ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
                    if ids[-1] == tok.eos_token_id:
                        break
            expected = tok.decode(ids[len(p["prompt_ids"]):], skip_special_tokens=True).strip()
            assert sample["outputs"][name] == expected, name
    assert generate_samples(models, rows, 0, 6) == []


def test_lm_eval_does_not_print_git_errors_outside_a_git_repository(tmp_path, monkeypatch, capfd):
    """lm-eval's simple_evaluate records ``git describe`` of the working directory
    (lm_eval/loggers/utils.py get_git_commit_hash, called from lm_eval/evaluator.py simple_evaluate)
    and lets git print "fatal: not a git repository" into the step's log; llmneo keeps no such hash."""
    import lm_eval.evaluator as evaluator

    from llmneo.evaluate import _without_env_report

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    with _without_env_report():
        evaluator.get_git_commit_hash()
    assert "fatal" not in capfd.readouterr().err
