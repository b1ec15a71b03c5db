"""distill.micro_batch_size=auto and distill.max_memory_gib: validation, the CPU choice, the card."""

import json

import pytest

from llmneo.cards import DistillCard
from llmneo.config import load_config
from llmneo.errors import UserError
from llmneo.launch import TrainerInputs, write_workdir
from llmneo.trainer import DistillTrainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("override, message", [
    ("distill.micro_batch_size=big", "distill.micro_batch_size: must be int or one of 'auto', got 'big'"),
    ("distill.micro_batch_size=0", "distill.micro_batch_size: must be int or one of 'auto', got 0"),
    ("distill.max_memory_gib=-1", "distill.max_memory_gib: must be >= 0.0, got -1.0"),
])
def test_bad_values_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(UserError) as info:
        load_config("tiny", [override])
    assert str(info.value) == message


def test_auto_and_int_are_accepted():
    assert load_config("tiny", ["distill.micro_batch_size=auto"]).distill.micro_batch_size == "auto"
    assert load_config("tiny", ["distill.micro_batch_size=4"]).distill.micro_batch_size == 4


def test_auto_on_cpu_trains_with_2_and_the_card_says_so(tiny_workspace, tmp_path):
    cfg = load_config("tiny", ["distill.micro_batch_size=auto", "distill.max_steps=1", "distill.save_every=0"])
    workdir = write_workdir(tmp_path, cfg, TrainerInputs.of(tiny_workspace / "dataset", tiny_workspace / "teacher",
                                                            tiny_workspace / "student"))
    trainer = DistillTrainer.from_workdir(workdir)
    trainer.setup()
    assert (trainer.micro_batch_size, trainer.accum) == (2, cfg.distill.global_batch_size // 2)
    trainer.save(trainer.train())
    trainer.cleanup()
    card = DistillCard.read(workdir)
    assert card.micro_batch_size == 2
    assert json.loads((workdir / "card.json").read_text())["micro_batch_size"] == 2
