"""Generate the preference data of the DPO example: train and held-out JSONL files.

The default task, `minmax`, is one a tiny model learns within a couple of minutes on a CPU, and
whose held-out accuracy shows real learning rather than memorisation (held-out problems never
appear in training):

    {"prompt": "max(37,512)=", "chosen": "512", "rejected": "37"}
    {"prompt": "min(37,512)=", "chosen": "37", "rejected": "512"}

The rejected answer is the other operand, so a model can only prefer the chosen one by reading the
operation and comparing the numbers. The `sum` task ("12+7=" → the sum over a random wrong number)
is harder: a tiny model learns plausibility (size, digits), not arithmetic, in that time.

    python examples/dpo/make_data.py                       # examples/dpo/data/{train,eval}.jsonl
    python examples/dpo/make_data.py --task sum --num-train 4000 --out /tmp/sums

Output is a pure function of the arguments (seeded), so every run trains on the same data.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

Record = dict[str, str]

DEFAULT_OUT = Path(__file__).resolve().parent / "data"


def _minmax(rng: random.Random, max_value: int) -> tuple[tuple, Record] | None:
    op = rng.choice(("max", "min"))
    x, y = rng.randint(0, max_value), rng.randint(0, max_value)
    if x == y:
        return None
    high, low = str(max(x, y)), str(min(x, y))
    chosen, rejected = (high, low) if op == "max" else (low, high)
    return (op, x, y), {"prompt": f"{op}({x},{y})=", "chosen": chosen, "rejected": rejected}


def _sum(rng: random.Random, max_value: int) -> tuple[tuple, Record] | None:
    x, y = rng.randint(0, max_value), rng.randint(0, max_value)
    wrong = rng.randint(0, 2 * max_value)
    if wrong == x + y:
        return None
    return (x, y), {"prompt": f"{x}+{y}=", "chosen": str(x + y), "rejected": str(wrong)}


TASKS: dict[str, Callable[[random.Random, int], tuple[tuple, Record] | None]] = {
    "minmax": _minmax,
    "sum": _sum,
}


def make_pairs(
    task: str = "minmax",
    *,
    num_train: int = 8000,
    num_eval: int = 256,
    max_value: int = 999,
    seed: int = 0,
) -> tuple[list[Record], list[Record]]:
    """(train, held-out) records; no problem of the held-out split occurs in the train split."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {sorted(TASKS)}")
    draw = TASKS[task]
    rng = random.Random(seed)
    seen: set[tuple] = set()
    splits: list[list[Record]] = []
    for size in (num_train, num_eval):
        records: list[Record] = []
        # bounded: a too small max_value for the requested sizes is an error, not a hang
        for _ in range(100 * (size + 10)):
            if len(records) == size:
                break
            drawn = draw(rng, max_value)
            if drawn is None or drawn[0] in seen:
                continue
            seen.add(drawn[0])
            records.append(drawn[1])
        else:
            raise ValueError(
                f"could not draw {size} distinct {task} problems with max_value={max_value}"
            )
        splits.append(records)
    return splits[0], splits[1]


def write_jsonl(records: list[Record], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="minmax")
    parser.add_argument("--num-train", type=int, default=8000)
    parser.add_argument("--num-eval", type=int, default=256)
    parser.add_argument("--max-value", type=int, default=999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    train, held_out = make_pairs(
        args.task,
        num_train=args.num_train,
        num_eval=args.num_eval,
        max_value=args.max_value,
        seed=args.seed,
    )
    paths = [args.out / "train.jsonl", args.out / "eval.jsonl"]
    for records, path in zip((train, held_out), paths, strict=True):
        write_jsonl(records, path)
        print(f"wrote {len(records)} pairs to {path}")
    return paths


if __name__ == "__main__":
    main()
