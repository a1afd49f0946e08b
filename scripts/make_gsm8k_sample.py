"""Writes data/gsm8k_sample.jsonl: programmatic grade-school word problems in GSM8K's format.

    python scripts/make_gsm8k_sample.py            # rewrites the committed file, byte for byte

Each record is {"question", "answer"} where the answer is the worked reasoning followed by
"#### <number>", as in GSM8K. The problems are generated here from templates and a fixed seed;
no dataset is copied. Used by the tests and as a format example for `--task math --data`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena"]
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "shells", "cards"]


def shopping(rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    count, price = rng.randint(2, 12), rng.randint(2, 9)
    paid = count * price + rng.choice([0, 5, 10, 20])
    change = paid - count * price
    return {
        "question": f"{name} buys {count} {item} at ${price} each and pays with ${paid}. How many dollars of change "
                    f"does {name} get back?",
        "answer": f"The {item} cost {count} * {price} = {count * price} dollars.\n"
                  f"The change is {paid} - {count * price} = {change} dollars.\n#### {change}",
    }


def sharing(rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each, left = rng.randint(2, 6), rng.randint(2, 8), rng.randint(0, 5)
    total = friends * each + left
    return {
        "question": f"{name} has {total} {item} and gives {each} to each of {friends} friends. How many {item} "
                    f"does {name} have left?",
        "answer": f"{name} gives away {friends} * {each} = {friends * each} {item}.\n"
                  f"{name} has {total} - {friends * each} = {left} left.\n#### {left}",
    }


def rate(rng: random.Random) -> dict:
    name = rng.choice(NAMES)
    per_hour, hours, days = rng.randint(3, 15), rng.randint(2, 8), rng.randint(2, 5)
    daily = per_hour * hours
    return {
        "question": f"{name} earns ${per_hour} an hour and works {hours} hours a day for {days} days. How many "
                    f"dollars does {name} earn?",
        "answer": f"Each day {name} earns {per_hour} * {hours} = {daily} dollars.\n"
                  f"Over {days} days that is {daily} * {days} = {daily * days} dollars.\n#### {daily * days}",
    }


def halves(rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = 2 * rng.randint(5, 40)
    bought = rng.randint(1, 20)
    half = start // 2
    return {
        "question": f"{name} had {start} {item}, lost half of them, then bought {bought} more. How many {item} "
                    f"does {name} have now?",
        "answer": f"Half of {start} is {start} / 2 = {half}.\n"
                  f"{name} has {half} + {bought} = {half + bought} {item}.\n#### {half + bought}",
    }


TEMPLATES = [shopping, sharing, rate, halves]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "data" / "gsm8k_sample.jsonl"))
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    lines = [json.dumps(TEMPLATES[i % len(TEMPLATES)](rng)) for i in range(args.count)]
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.count} problems to {args.out}")


if __name__ == "__main__":
    main()
