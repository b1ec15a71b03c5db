"""The merge's precision check: casting the merged student to bf16 rounds away adapter updates smaller
than half a bf16 step. merge-eval measures the share of the KL gain that rounding loses and, over
``eval.max_merge_loss``, saves fp32 (``eval.merge_fallback=fp32``) or fails the gate (``fail``).

The student is a tiny model stored in bf16 (so ``merged_dtype=auto`` means bf16, as for SmolLM2) with a
large LM head (logits of tens of units, so small weight changes give KLs far above fp32 noise). The
adapters are built, not trained: LoRA B is scaled so that each layer's update is a fixed fraction of
its weight (1e-3: below bf16's relative step of 2^-8, so most of it rounds away; 0.1: far above). The
teacher is the fp32 merged model itself: the adapter model has KL 0 to it, the base student some KL,
so all of the gain is the adapter's."""

import dataclasses
import json

import pytest
import torch

from llmneo.cards import DistillCard, EvalCard, ModelCard
from llmneo.config import load_config
from llmneo.data import read_split
from llmneo.evaluate import merge_rounding, run_merge_eval
from llmneo.models import load_causal_lm, load_tokenizer

HEAD_SCALE = 100.0


def save_model(model, tokenizer, folder, card: ModelCard) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    card.write(folder)


@pytest.fixture(scope="module")
def bf16_student(tiny_workspace, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-precision")
    model = load_causal_lm(tiny_workspace / "student", dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    card = dataclasses.replace(ModelCard.read(tiny_workspace / "student"), dtype="bfloat16", content_hash=None)
    save_model(model.to(torch.bfloat16), load_tokenizer(tiny_workspace / "student"), root / "student", card)
    assert json.loads((root / "student" / "config.json").read_text())["dtype"] == "bfloat16"
    return root


def adapter_run(root, name: str, relative: float):
    """A distill folder whose LoRA update is ``relative`` × each adapted weight (Frobenius norms), and a
    teacher folder holding the fp32 merged model. Returns (distill dir, teacher dir)."""
    from peft import LoraConfig, get_peft_model

    base = load_causal_lm(root / "student", dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                weight = module.base_layer.weight
                delta = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
                module.lora_B["default"].weight.mul_(relative * weight.norm() / delta.norm())
    distill = root / name / "distill"
    model.save_pretrained(distill / "adapter")
    DistillCard(method="neo", status="complete").write(distill)
    tokenizer = load_tokenizer(root / "student")
    student_card = ModelCard.read(root / "student")
    save_model(model.merge_and_unload(), tokenizer, root / name / "teacher",
               dataclasses.replace(student_card, role="teacher", source=f"test:{name}", dtype="float32"))
    return distill, root / name / "teacher"


@pytest.fixture(scope="module")
def small_update(bf16_student):
    return adapter_run(bf16_student, "small", 1e-3)


def merge_eval(tiny_workspace, root, run, out_name, *overrides):
    distill, teacher = run
    # the large head makes the random model's perplexity astronomic: only the merge may fail the gate
    cfg = load_config("tiny", ["eval.lm_eval_tasks=[]", "eval.max_perplexity=1e30", *overrides])
    out = root / out_name
    result = run_merge_eval(cfg, tiny_workspace / "dataset", teacher, root / "student", distill, out)
    return result, out


def saved_dtype(folder) -> str:
    return json.loads((folder / "config.json").read_text())["dtype"]


def test_a_bf16_merge_that_loses_the_gain_is_saved_in_fp32(tiny_workspace, bf16_student, small_update):
    result, out = merge_eval(tiny_workspace, bf16_student, small_update, "fp32-fallback")
    m = result["merge"]
    assert (m["requested_dtype"], m["saved_dtype"], m["action"]) == ("bfloat16", "float32", "fp32")
    assert m["kl_adapter"] < 1e-9 and m["kl_base"] > 1e-6  # the teacher is the adapter model
    assert m["kl_rounded"] > m["kl_adapter"] + 0.5 * (m["kl_base"] - m["kl_adapter"])  # bf16 kept < half the gain
    assert m["gain_lost"] == pytest.approx((m["kl_rounded"] - m["kl_adapter"]) / (m["kl_base"] - m["kl_adapter"]))
    assert m["gain_lost"] > 0.5 and m["max_gain_lost"] == 0.01
    assert saved_dtype(out) == "float32"
    # what is saved and evaluated keeps the gain: the distilled model's KL is the adapter model's
    summary = result["summary"]
    assert summary["distilled"]["kl_to_teacher"] == pytest.approx(m["kl_adapter"], abs=1e-6)
    assert summary["base_student"]["kl_to_teacher"] == pytest.approx(m["kl_base"], rel=1e-5)
    assert result["gate"]["passed"] and result["gate"]["reasons"] == []
    # recorded in eval.json, the card (and its KFP metrics) and the reports
    assert json.loads((out / "eval.json").read_text())["merge"] == m
    card = EvalCard.read(out)
    assert card.merge == m and card.step_metrics()["merge_gain_lost"] == pytest.approx(m["gain_lost"])
    # the card holds the SHA-256 of the weights evaluated: the saved safetensors, as register checks them
    assert set(card.weights) == {p.name for p in out.glob("*.safetensors")} != set()
    card.check_weights(out)
    for report in ("report.md", "report.html"):
        text = (out / report).read_text()
        assert "saved in float32 instead" in text and f"{m['gain_lost']:.2%} of the gain lost" in text, report


def test_fail_fallback_fails_the_gate_with_a_reason_naming_the_loss(tiny_workspace, bf16_student, small_update):
    result, out = merge_eval(tiny_workspace, bf16_student, small_update, "fail", "eval.merge_fallback=fail")
    m = result["merge"]
    assert (m["saved_dtype"], m["action"]) == ("bfloat16", "fail") and saved_dtype(out) == "bfloat16"
    assert not result["gate"]["passed"]
    (reason,) = result["gate"]["reasons"]
    assert reason.startswith(f"merge: rounding to bfloat16 loses {m['gain_lost']:.1%} of the KL gain")
    assert "eval.max_merge_loss 0.01" in reason
    assert not EvalCard.read(out).passed
    # the bf16 model that is evaluated is the rounded one: its KL is the rounded KL
    assert result["summary"]["distilled"]["kl_to_teacher"] == pytest.approx(m["kl_rounded"], rel=1e-4)


def test_a_large_update_keeps_bf16(tiny_workspace, bf16_student):
    result, out = merge_eval(tiny_workspace, bf16_student, adapter_run(bf16_student, "large", 0.1), "large")
    m = result["merge"]
    assert (m["saved_dtype"], m["action"]) == ("bfloat16", "kept") and saved_dtype(out) == "bfloat16"
    assert 0.0 <= m["gain_lost"] < 0.01 and m["kl_base"] > 0.01 and m["kl_rounded"] > 0
    assert result["gate"]["passed"]


def test_the_limit_is_configurable_and_fp32_needs_no_check(tiny_workspace, bf16_student, small_update):
    distill, teacher = small_update
    merged = load_causal_lm(teacher, dtype=torch.float32)  # = the fp32 merge
    base = load_causal_lm(bf16_student / "student", dtype=torch.float32)
    rows = read_split(tiny_workspace / "dataset", "val")
    lenient = load_config("tiny", ["eval.max_merge_loss=0.999"])
    m = merge_rounding(merged, base, merged, rows, 0, torch.bfloat16, lenient)
    assert (m["action"], m["saved_dtype"]) == ("kept", "bfloat16") and 0.5 < m["gain_lost"] <= 0.999
    exact = merge_rounding(merged, None, merged, rows, 0, torch.float32, load_config("tiny"))
    assert exact == {"requested_dtype": "float32", "saved_dtype": "float32", "kl_base": None, "kl_adapter": None,
                     "kl_rounded": None, "gain_lost": 0.0, "max_gain_lost": 0.01, "action": "exact"}
    # an adapter that does not lower the KL has no gain to lose: nothing to decide, merged_dtype stays
    no_gain = merge_rounding(base, merged, merged, rows, 0, torch.bfloat16, load_config("tiny"))
    assert (no_gain["action"], no_gain["saved_dtype"], no_gain["gain_lost"]) == ("no_gain", "bfloat16", None)
