"""Final-answer checking: the only reward signal AlphaMath self-training gets.

The paper trains from questions + final answers alone, so every terminal node's reward (and
the value-head target of every step on its path) comes from `is_equiv(pred, truth)`. A false
negative teaches the value head that a correct path is wrong; a false positive rewards a
wrong one. Hence: exact by default, lenient only where MATH-style notation differs
("1,000"/"1000", "0.5"/"\\frac12", "30^\\circ"/"30", units, "\\text{(C)}"/"C").

Design (measured on this 2-core machine; `python -m alphamath.answer bench PAIRS.jsonl`):
  1. A string/numeric fast path in-process (regex normalisation + exact `Fraction`
     arithmetic), this module. It decides the large majority of checks (integers, decimals,
     fractions, multiple-choice letters, words) in ~0.01-0.1 ms and never calls sympy: all
     4,504 MATH answers against their normalised form need it for all but one.
  2. Everything else (expressions, radicals, intervals, tuples, sets, matrices) goes to a
     small pool of persistent math-verify/sympy worker processes with a hard deadline per
     check (alphamath.symbolic, which also lists the pool's knobs).
Any parse failure, worker crash or timeout answers "not equal"; only wrong argument types
raise. This module is also where final answers are read out of text (`boxed_content`,
`strip_boxed`), for alphamath.steps as for the checker.
"""
from __future__ import annotations

import functools
import json
import logging
import re
import sys
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

# warmup/shutdown are part of this module's API; the pool and its cache are also reached through this
# module (the bench below, tests), and `python -m alphamath.answer serve` still runs a worker.
from alphamath.symbolic import _SYM_CACHE, _pool, _serve, shutdown, symbolic_equiv, warmup  # noqa: F401

__all__ = ["normalize_answer", "is_equiv", "boxed_content", "warmup", "shutdown", "stats"]

log = logging.getLogger(__name__)

# Relative tolerance for a decimal against a rational with no finite decimal expansion
# ("0.333333" vs "\frac13"). Six significant digits is what a model that computed the value
# and rounded it writes; "0.33" is 1% off and is rejected, as in MATH grading.
DECIMAL_RTOL = 1e-6

_MAX_ANSWER_CHARS = 4000


# ----------------------------------------------------------------------------------------
# Normalisation (pure string work, thread-safe, no sympy)
# ----------------------------------------------------------------------------------------

_LOST_ESCAPES = {"\t": "t", "\f": "f", "\b": "b", "\r": "r", "\v": "v", "\a": "a"}
_LOST_BACKSLASH = re.compile(r"[\t\f\b\r\v\a](?=[a-zA-Z])")
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED = re.compile(r"\\boxed\s*\{")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textrm|mbox|mathrm|mathbf|mathit|operatorname)\s*\{")
_FRAC_SHORT = re.compile(r"\\frac\s*(\d|\{[^{}]*\})\s*(\d|\{[^{}]*\})")
_SQRT_SHORT = re.compile(r"\\sqrt\s*(\d+|[a-zA-Z])")
_DEGREE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|°|\\degree")
_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+)(?![\d,]|\.\d*,)")
_LIST_COMMA = re.compile(r",(?!\d{3}(?!\d))")
_UNIT_WORDS = frozenset(
    """cm mm m km in inch inches ft foot feet yd yard yards mile miles mi unit units sq square
    cubic degree degrees deg cent cents dollar dollars hour hours hr hrs minute minutes min mins
    second seconds sec s day days week weeks month months year years meter meters metre metres
    centimeter centimeters kilometer kilometers gm g kg gram grams pound pounds lb lbs oz ounce
    ounces mph kph liter liters l ml gallon gallons people person students points marbles
    cookies apples ways""".split()
)
# Words after a number: "81 teachers", "12 square units", "5 cm^2". Words are separated by
# required whitespace so the regex stays linear on long letter runs.
_WORD_TAIL = re.compile(r"^(.*?[\d}.])\s*((?:[a-zA-Z]+\.?\s+)*[a-zA-Z]+\.?)\s*(\^\{?[23]\}?)?$")
_ASSIGN = re.compile(r"^[a-zA-Z](?:_\{?\w+\}?)?\s*(?:=|\\in)\s*(?=[^=]*$)")
_CHOICES = re.compile(r"^\(?[A-J]\)?(?:(?:\s*,\s*|\s+and\s+|\s+)\(?[A-J]\)?)*$")


def _balanced_group(s: str, open_idx: int) -> int | None:
    """Index just past the '}' matching the '{' at open_idx; None if unbalanced."""
    depth = 0
    for i in range(open_idx, len(s)):
        c = s[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _box_ends(s: str, box: re.Pattern) -> dict[int, int | None]:
    """For the opening brace of every `box` match in s, the index of its matching '}' (None if
    unbalanced). One pass over the braces, so nested or unbalanced model output stays linear."""
    ends: dict[int, int | None] = {m.end() - 1: None for m in box.finditer(s)}
    if ends:
        stack = []
        for i, c in enumerate(s):
            if c == "{":
                stack.append(i)
            elif c == "}" and stack:
                j = stack.pop()
                if j in ends:
                    ends[j] = i
    return ends


def strip_boxed(s: str) -> str:
    """Content of the last balanced \\boxed{...} (or \\fbox) in s; s itself if there is none."""
    closed = {j: end for j, end in _box_ends(s, _BOX).items() if end is not None}
    if not closed:
        return s
    j = max(closed)
    return s[j + 1 : closed[j]]


def boxed_content(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced; None if absent or unbalanced."""
    ends = _box_ends(text, _BOXED)
    if not ends:
        return None
    j = max(ends)
    return None if ends[j] is None else text[j + 1 : ends[j]].strip()


def _replace_text_commands(s: str) -> tuple[str, bool]:
    """Unwrap \\text{..} and friends. A \\text{} that trails other content is a unit or a
    connective word ("5\\text{ cm}", "7, -2, \\text{ and } -5") and is dropped; one that is
    the whole answer ("\\text{(C)}", "\\text{odd}") is unwrapped. Returns (s, was_all_text)."""
    m = _TEXT_CMD.match(s)
    if m:
        end = _balanced_group(s, m.end() - 1)
        if end == len(s):
            inner, _ = _replace_text_commands(s[m.end() : end - 1])
            return inner, True
    out, i = [], 0
    for m in _TEXT_CMD.finditer(s):
        if m.start() < i:
            continue
        end = _balanced_group(s, m.end() - 1)
        if end is None:
            break
        inner = s[m.end() : end - 1]
        before = "".join(out) + s[i : m.start()]
        if before.strip() and re.fullmatch(r"[\sA-Za-z.,'^{}0-9]*", inner) and re.search(r"[A-Za-z]", inner):
            out.append(s[i : m.start()] + " , " if re.fullmatch(r"\s*(and|or)\s*", inner) else s[i : m.start()])
        else:
            out.append(s[i : m.start()] + inner)
        i = end
    out.append(s[i:])
    return "".join(out), False


def _squeeze_spaces(s: str) -> str:
    """Drop spaces except where one separates a command or letter from a following letter."""
    s = re.sub(r"\s+", " ", s).strip()
    return re.sub(r"(?<=(.)) (?=(.))", lambda m: " " if (m.group(1).isalpha() and m.group(2).isalpha()) else "", s)


@dataclass(frozen=True)
class _Norm:
    """A normalised answer: `text` is the comparison key; flags remember what was dropped."""

    text: str
    percent: bool = False
    all_text: bool = False


@functools.lru_cache(maxsize=65536)
def _normalize(s: str) -> _Norm:
    # "\tfrac", "\frac", "\boxed", "\right" whose backslash a JSON round trip ate (one MATH
    # training answer has a literal TAB + "frac32"); control characters never start a word.
    s = _LOST_BACKSLASH.sub(lambda m: "\\" + _LOST_ESCAPES[m.group(0)], s)
    s = strip_boxed(s.strip())
    s = s.replace("\u2212", "-").replace("\u2013", "-").replace("\\$", "").replace("$", "")
    s = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", s.strip())
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)\b\s*(\\[{}]|[()\[\].|])?", lambda m: m.group(1) or "", s)
    s = re.sub(r"\\(?:left|right)\s*\\?([{}])", r"\1", s)
    s = s.replace("\\displaystyle", "")
    s = re.sub(r",\s*\\!\s*", ",", s)  # "18,\!107"
    s = s.replace("{,}", ",")
    s = re.sub(r"(?<!\\)\\[!,;: ]|~", " ", s)  # thin spaces, not the "\\" row break
    s = re.sub(r"\\[dtc]frac", r"\\frac", s)
    s = re.sub(r"\\[dt]binom", r"\\binom", s)
    s, all_text = _replace_text_commands(s)
    s = _DEGREE.sub("", s)
    percent = bool(re.search(r"\\?%", s))
    s = re.sub(r"\\?%", "", s)
    s = re.sub(r"\s+(?:and|or)\s+", ",", s)
    s = s.strip().rstrip(".").strip()
    for _ in range(2):
        s = _FRAC_SHORT.sub(lambda m: "\\frac{%s}{%s}" % (m.group(1).strip("{}"), m.group(2).strip("{}")), s)
    s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
    s = _ASSIGN.sub("", s)
    if not _LIST_COMMA.search(s):  # "1,000" is a number, "27,63,99,135" a list
        s = _THOUSANDS.sub(lambda m: m.group(1).replace(",", ""), s)
    tail = _WORD_TAIL.match(s)
    if tail and _parse_number(_squeeze_spaces(tail.group(1))) is not None:
        words = tail.group(2).lower().replace(".", " ").split()
        if all(w in _UNIT_WORDS or len(w) > 2 for w in words):
            s = tail.group(1)
    s = _squeeze_spaces(s)
    s = re.sub(r",+", ",", s).strip(",")
    return _Norm(s, percent=percent, all_text=all_text)


_NUM = re.compile(r"^([+-]?)(\d+\.?\d*|\.\d+)(?:(?:[eE]|\\times10\^|\\cdot10\^|\*10\^)\{?([+-]?\d+)\}?)?$")
_FRAC_NUM = re.compile(r"^([+-]?)(\d*)\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}$")
_SLASH_NUM = re.compile(r"^([+-]?)(\d+)/(\d+)$")


@dataclass(frozen=True)
class _Number:
    value: Fraction
    decimal: bool  # written with a decimal point or exponent (may be a rounded value)


def _parse_number(s: str) -> _Number | None:
    """Exact value of a plain number: 12, -3.50, .5, 1.5e3, 1.5\\times10^{3}, \\frac{a}{b},
    a/b, 1\\frac{1}{4} (a mixed number, as MATH writes them). None for anything else."""
    m = _NUM.match(s)
    if m:
        sign, mant, exp = m.groups()
        v = Fraction(mant)
        if exp is not None:
            if abs(int(exp)) > 400:
                return None
            v *= Fraction(10) ** int(exp)
        return _Number(-v if sign == "-" else v, "." in mant or exp is not None)
    m = _FRAC_NUM.match(s)
    if m:
        sign, whole, num, den = m.groups()
        if int(den) == 0:
            return None
        v = Fraction(int(num), int(den))
        if whole:
            if v < 0:
                return None
            v += int(whole)
        return _Number(-v if sign == "-" else v, False)
    m = _SLASH_NUM.match(s)
    if m and int(m.group(3)) != 0:
        v = Fraction(int(m.group(2)), int(m.group(3)))
        return _Number(-v if m.group(1) == "-" else v, False)
    return None


def _fmt_fraction(v: Fraction) -> str:
    if v.denominator == 1:
        return str(v.numerator)
    sign = "-" if v < 0 else ""
    return "%s\\frac{%d}{%d}" % (sign, abs(v.numerator), v.denominator)


def _choices(n: _Norm) -> frozenset[str] | None:
    """Multiple-choice letters ("\\text{(C)}", "A, D", "\\text{ACF}"), else None."""
    t = n.text
    if _CHOICES.match(t):
        return frozenset(re.findall(r"[A-J]", t))
    if n.all_text and re.fullmatch(r"[A-J]{1,10}", t):
        return frozenset(t)
    return None


def _word(n: _Norm) -> str | None:
    """A word answer ("odd", "\\text{Sunday}"): lower-cased, else None."""
    if re.fullmatch(r"[A-Za-z][A-Za-z' -]*", n.text) and (n.all_text or len(n.text) >= 3):
        return n.text.lower()
    return None


def normalize_answer(s: str) -> str:
    """Canonical string for an answer: the key for voting/grouping and for display.

    Strips \\boxed, $, \\left/\\right, spacing, units, \\text wrappers, degrees, percent signs
    and thousands separators; plain numbers become an integer or a reduced \\frac{p}{q}, so
    "0.5", ".50" and "\\dfrac{1}{2}" share a key. Total: never raises on a string.
    """
    if not isinstance(s, str):
        raise TypeError(f"answer must be str, got {type(s).__name__}")
    try:
        n = _normalize(s)
    except Exception:  # noqa: BLE001 - normalisation must never take a search down
        return s.strip()
    num = _parse_number(n.text)
    if num is not None:
        return _fmt_fraction(num.value)
    ch = _choices(n)
    if ch is not None:
        return ",".join(sorted(ch))
    return n.text


def _numbers_equal(a: _Number, b: _Number) -> bool:
    if a.value == b.value:
        return True
    # A rounded decimal may stand for a rational without a finite decimal expansion.
    for d, r in ((a, b), (b, a)):
        if d.decimal and not r.decimal and not _terminates(r.value):
            if abs(d.value - r.value) <= Fraction(DECIMAL_RTOL) * max(1, abs(r.value)):
                return True
    return False


def _terminates(v: Fraction) -> bool:
    q = v.denominator
    for p in (2, 5):
        while q % p == 0:
            q //= p
    return q == 1


_FAST_UNDECIDED = None


def _fast_equiv(p: _Norm, t: _Norm) -> bool | None:
    """Decide without sympy where notation alone settles it; None hands over to sympy."""
    if p.text == t.text and p.text:
        return True
    if not p.text or not t.text:
        return False
    pn, tn = _parse_number(p.text), _parse_number(t.text)
    if pn is not None and tn is not None:
        if _numbers_equal(pn, tn):
            return True
        # "25\%" may be answered as 0.25 (and vice versa): the stripped % scales by 100.
        if p.percent != t.percent:
            scaled = _Number(pn.value / 100, True) if p.percent else _Number(tn.value / 100, True)
            return _numbers_equal(scaled, tn) if p.percent else _numbers_equal(pn, scaled)
        return False
    tc = _choices(t)
    if tc is not None:
        return _choices(p) == tc
    tw = _word(t)
    if tw is not None:
        return _word(p) == tw
    if tn is not None and re.fullmatch(r"[A-Za-z' -]+", p.text):
        return False  # a word against a number
    return _FAST_UNDECIDED


# ----------------------------------------------------------------------------------------
# How checks were decided
# ----------------------------------------------------------------------------------------

_STATS = {"fast": 0, "cached": 0, "symbolic": 0, "timeout": 0, "error": 0, "busy": 0}
_STATS_LOCK = threading.Lock()


def _count(key: str) -> None:
    with _STATS_LOCK:
        _STATS[key] += 1


def stats() -> dict[str, int]:
    """How checks were decided since start-up (for metrics)."""
    with _STATS_LOCK:
        return dict(_STATS)


def is_equiv(pred: str | None, truth: str | Sequence[str], timeout_s: float = 3.0) -> bool:
    """Whether the model's final answer `pred` equals the ground truth `truth`.

    Both are answer strings in MATH/GSM8K style (a \\boxed{} wrapper is removed). A list of
    truths means "any of these" (a few MATH problems accept either of two points). Returns
    within about `timeout_s` of symbolic work per truth (plus any wait for a free worker),
    from any thread; a timeout, a parse failure or a missing answer is False.
    """
    if isinstance(truth, (list, tuple)):
        if not truth or not all(isinstance(t, str) for t in truth):
            raise TypeError("truth must be a str or a non-empty sequence of str")
        return any(is_equiv(pred, t, timeout_s) for t in truth)
    if not isinstance(truth, str):
        raise TypeError(f"truth must be str, got {type(truth).__name__}")
    if pred is None:
        return False
    if not isinstance(pred, str):
        raise TypeError(f"pred must be str or None, got {type(pred).__name__}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if len(pred) > _MAX_ANSWER_CHARS or len(truth) > _MAX_ANSWER_CHARS:
        # A final answer this long is a runaway generation; only identical text counts.
        return strip_boxed(pred).strip() == strip_boxed(truth).strip()
    try:
        p, t = _normalize(pred), _normalize(truth)
        fast = _fast_equiv(p, t)
    except Exception:  # noqa: BLE001
        log.debug("fast path failed on %.80r vs %.80r", pred, truth, exc_info=True)
        fast, p, t = _FAST_UNDECIDED, _Norm(strip_boxed(pred)), _Norm(strip_boxed(truth))
    if fast is not None:
        _count("fast")
        return fast
    equal, how = symbolic_equiv(p.text, t.text, timeout_s)
    _count(how)
    return equal


def _bench(path: str) -> int:
    """Accuracy and per-check latency of is_equiv on a JSONL table of {pred, truth, equal}."""
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    t0 = time.perf_counter()
    warmup()
    print(f"warmup {time.perf_counter() - t0:.2f}s ({_pool().size} workers)")
    latencies, wrong = [], []
    for row in rows:
        t = time.perf_counter()
        got = is_equiv(row["pred"], row["truth"])
        latencies.append(time.perf_counter() - t)
        if got != row["equal"]:
            wrong.append(row)
    for row in wrong:
        print(f"WRONG expected={row['equal']} pred={row['pred']!r} truth={row['truth']!r}")
    latencies.sort()
    q = lambda f: 1e3 * latencies[min(len(latencies) - 1, int(f * len(latencies)))]  # noqa: E731
    print(
        f"accuracy {len(rows) - len(wrong)}/{len(rows)}; latency p50 {q(0.5):.3f} ms, "
        f"p95 {q(0.95):.1f} ms, max {1e3 * latencies[-1]:.1f} ms; {stats()}"
    )
    return 1 if wrong else 0


def _main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        _serve()
        return 0
    if len(argv) == 3 and argv[0] == "check":
        equal = is_equiv(argv[1], argv[2])
        print("equal" if equal else "not equal")
        return 0 if equal else 1
    if len(argv) == 2 and argv[0] == "bench":
        return _bench(argv[1])
    print("usage: python -m alphamath.answer check PRED TRUTH | bench PAIRS.jsonl | serve", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
