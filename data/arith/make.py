"""Writes train.jsonl and dev.jsonl: easy one- or two-step arithmetic word problems with known
answers, for quick accuracy checks and the learning benchmark. Deterministic (seeded)."""
import json
import random
from pathlib import Path

NAMES = ["Sam", "Mia", "Ali", "Zoe", "Ben", "Ava", "Leo", "Ivy", "Max", "Eva"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "cards", "shells"]


def problem(rng: random.Random) -> tuple[str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 20), rng.randint(2, 12), rng.randint(1, 9)
    kind = rng.randrange(5)
    if kind == 0:
        return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
    if kind == 1:
        return f"{name} has {a + b} {item} and gives away {b}. How many {item} are left?", a
    if kind == 2:
        return f"{name} buys {b} bags with {c} {item} in each bag. How many {item} does {name} have?", b * c
    if kind == 3:
        return (f"{name} shares {b * c} {item} equally among {b} friends. How many {item} does each "
                f"friend get?"), c
    return (f"{name} has {b} boxes of {c} {item} and then finds {a} more {item}. How many {item} does "
            f"{name} have in total?"), b * c + a


def main():
    rng = random.Random(20240607)
    seen, rows = set(), []
    while len(rows) < 260:
        q, ans = problem(rng)
        if q not in seen:
            seen.add(q)
            rows.append({"id": f"arith-{len(rows):04d}", "question": q, "answer": str(ans)})
    here = Path(__file__).parent
    # dev: the first 30 (as before) and 30 more drawn after train, so that one problem is <= 2 points
    for name, part in (("dev", rows[:30] + rows[230:]), ("train", rows[30:230])):
        (here / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))


if __name__ == "__main__":
    main()
