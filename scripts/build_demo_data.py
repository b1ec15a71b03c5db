"""Build llmneo/assets/smollm2_instruct.jsonl: template prompts answered by the teacher itself.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/build_demo_data.py [--limit N]

The embedded default distills SmolLM2-135M-Instruct into its pruned copy. Its instruction set is
written for this project from templates (below); the responses are the teacher's own greedy answers
(sequence-level KD data, as allowed by the issue), so the demo's val split measures how closely the
student follows the teacher. Deterministic: fixed templates, fixed seed, greedy decoding.
"""

from __future__ import annotations

import argparse
import json
import random
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
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmneo.models import smollm2_dir

    torch.manual_seed(0)
    path = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    items = prompts()
    if args.limit:
        items = items[: args.limit]
    rows = []
    for start in tqdm(range(0, len(items), args.batch_size), desc="teacher answers"):
        batch = items[start:start + args.batch_size]
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                         add_generation_prompt=True) for p in batch]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        for prompt, ids in zip(batch, out[:, enc["input_ids"].shape[1]:], strict=True):
            answer = tok.decode(ids, skip_special_tokens=True).strip()
            if answer:
                rows.append({"messages": [{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": answer}]})
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {OUT.relative_to(OUT.parents[2])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
