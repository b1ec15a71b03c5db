"""Build llmneo/assets/smollm2_instruct.jsonl: template prompts answered by the teacher itself.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/build_demo_data.py [--limit N]

The embedded default distills SmolLM2-135M-Instruct into its pruned copy. Its instruction set is
written for this project from templates (below); the responses are the teacher's own greedy answers,
written by the product's own generation step (``data.answers=teacher``, :mod:`llmneo.generate`) — the
same path a user takes with prompt-only data. Deterministic: fixed templates, greedy decoding.
Answers cut at ``--max-new-tokens`` are rejected (not kept), as in the pipeline.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "llmneo" / "assets" / "smollm2_instruct.jsonl"

COUNTRIES = ["France", "Germany", "Italy", "Spain", "Japan", "Canada", "Egypt", "Kenya", "Peru", "Norway",
             "Poland", "Greece", "Brazil", "India", "China", "Mexico", "Australia", "Sweden", "Portugal",
             "Argentina", "Turkey", "Ireland", "Chile", "Vietnam"]
TOPICS = ["photosynthesis", "gravity", "the water cycle", "volcanoes", "the moon", "rainbows", "electricity",
          "magnets", "the heart", "bees", "clouds", "earthquakes", "the internet", "vaccines", "recycling",
          "the seasons", "tides", "dinosaurs", "the solar system", "friction", "sound", "plants", "the ocean",
          "batteries", "bread"]
WORDS = ["happy", "fast", "bright", "cold", "big", "quiet", "strong", "early", "rich", "soft", "brave",
         "clean", "young", "heavy", "simple", "kind"]
ANIMALS = ["cat", "dog", "horse", "eagle", "dolphin", "elephant", "penguin", "owl", "frog", "whale", "lion",
           "rabbit", "shark", "bee", "snake", "turtle"]
THINGS = ["fruits", "vegetables", "colors", "musical instruments", "planets", "sports", "countries in Europe",
          "kitchen tools", "birds", "programming languages", "ocean animals", "board games", "flowers",
          "metals", "rivers", "things you find in a classroom"]
ACTIVITIES = ["sleep better", "study for an exam", "save money", "stay healthy", "learn a new language",
              "make friends in a new city", "reduce stress", "write a good email", "cook rice", "keep a plant alive",
              "prepare for a job interview", "start running"]
SENTENCES = ["the cat sat on the mat", "i am going to the store tomorrow", "she like to read books",
             "they was late for the meeting", "the sun rises in the east", "we has finished our homework",
             "he don't know the answer", "birds can fly high in the sky"]


def prompts(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    out += [f"What is the capital of {c}?" for c in COUNTRIES]
    out += [f"Explain {t} in one or two sentences." for t in TOPICS]
    out += [f"What is {t}?" for t in TOPICS[:12]]
    out += [f"Give a synonym and an antonym for the word '{w}'." for w in WORDS]
    out += [f"Describe a {a} in one sentence." for a in ANIMALS]
    out += [f"Where does a {a} live?" for a in ANIMALS[:10]]
    out += [f"Name three {t}." for t in THINGS]
    out += [f"Give two tips to {a}." for a in ACTIVITIES]
    out += [f"Correct the grammar of this sentence: \"{s}\"" for s in SENTENCES]
    for _ in range(30):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        op = rng.choice(["plus", "minus", "times"])
        out.append(f"What is {a} {op} {b}?")
    out += [f"Write a short, friendly greeting for a {w} morning." for w in ["sunny", "rainy", "cold", "busy"]]
    out += [f"Translate the word '{w}' into French." for w in ["cat", "house", "water", "book", "friend", "bread"]]
    out += [f"How many legs does a {a} have?" for a in ANIMALS]
    out += [f"Is a {a} a mammal?" for a in ANIMALS]
    out += [f"What is the opposite of '{w}'?" for w in WORDS]
    out += [f"Use the word '{w}' in a sentence." for w in WORDS]
    out += [f"Why is {t} important?" for t in TOPICS[12:]]
    out += [f"What color is {x}?" for x in ["the sky", "grass", "a banana", "snow", "a tomato", "coal",
                                             "an orange", "the sea", "a lemon", "chocolate"]]
    out += [f"What is the plural of '{w}'?" for w in ["child", "mouse", "box", "city", "leaf", "foot", "tooth",
                                                       "person", "woman", "knife"]]
    return list(dict.fromkeys(out))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    from llmneo.config import load_config
    from llmneo.generate import ANSWERS, run_generate

    items = prompts()
    if args.limit:
        items = items[: args.limit]
    with tempfile.TemporaryDirectory(prefix="llmneo-demo-data-") as tmp:
        source = Path(tmp) / "prompts.jsonl"
        source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in items))
        card = run_generate(load_config("smollm2-demo", [
            f"data.source={source}", "data.answers=teacher", f"generate.max_new_tokens={args.max_new_tokens}",
            f"generate.batch_size={args.batch_size}", "generate.temperature=0"]), Path(tmp) / "answers")
        rows = [json.loads(line) for line in (Path(tmp) / "answers" / ANSWERS).read_text().splitlines()]
    OUT.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {OUT.relative_to(OUT.parents[2])} ({card.counts['rejected']} prompts rejected: "
          f"{card.rejected_by_kind})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
