"""Problem files: JSONL lines of {"id", "question", "answer"}; errors name the line."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Problem:
    id: str
    question: str
    answer: str


class DataError(ValueError):
    pass


def load_problems(path: str | Path, limit: int | None = None) -> list[Problem]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if isinstance(row, dict) and isinstance(row.get("answer"), list) and row["answer"]:
                row["answer"] = row["answer"][0]  # a few MATH items list several accepted forms
            if not isinstance(row, dict) or not all(isinstance(row.get(k), (str, int, float)) for k in ("question", "answer")):
                raise DataError(f'{path}:{lineno}: expected an object with "question" and "answer"')
            if not str(row["question"]).strip():
                raise DataError(f"{path}:{lineno}: empty question")
            out.append(Problem(str(row.get("id", f"{path.stem}-{lineno}")), str(row["question"]), str(row["answer"])))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise DataError(f"{path}: no problems")
    return out


def difficulty(p: Problem) -> tuple:
    """A cheap proxy for how hard a word problem is: how far the count of numbers written in digits
    is from two (fewer means numbers spelled out in words, more means more operations), then its
    length. Used to take the easier GSM8K problems first for a small model."""
    return (abs(len(re.findall(r"\d+(?:[.,]\d+)*", p.question)) - 2), len(p.question), p.id)


def easiest(problems: list[Problem], k: int | None = None) -> list[Problem]:
    """The k easiest problems by `difficulty`, in that order (all of them if k is None)."""
    return sorted(problems, key=difficulty)[:k]
