"""The paper's step format, the round-0 prompt and a parser that never raises.

A solution is a sequence of steps. Each step is written as

    <step>thought text
    <code>
    python code
    </code>
    <output>
    what the code printed
    </output>
    </step>

where the code/output pair is optional. The policy generates one step per call: the prompt ends
with "<step>" and generation stops at "</code>" (then the engine runs the code and appends the
output block and "</step>") or at "</step>". The last step states the final answer in
\\boxed{...} (or <answer>...</answer>).
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass

from alphamath.answer import boxed_content
from alphamath.interfaces import Sample

STEP_OPEN, STEP_CLOSE = "<step>", "</step>"
CODE_OPEN, CODE_CLOSE = "<code>", "</code>"
OUTPUT_OPEN, OUTPUT_CLOSE = "<output>", "</output>"
STOP = (CODE_CLOSE, STEP_CLOSE)
MAX_OUTPUT_CHARS = 1024  # code output is cut so one step cannot flood the context

SYSTEM = (
    "You solve math problems step by step. Write each step inside <step> ... </step>. "
    "When a calculation is needed, write Python inside <code> ... </code> and print the result; "
    "its output is shown to you inside <output> ... </output>. "
    "In the last step give the final answer as \\boxed{answer}."
)

# The worked examples compute the whole answer in code and read it off the output in the last step.
# Until session 36 they computed a part in code and the rest in prose ("36 - 7 = 29"): the embedded
# model copied that shape and got the prose arithmetic wrong, and the trained policy, after a correct
# print(12 * 6 + 5) printed 77, wrote "12 + 5 = 27" at priors 0.83-0.99 (session 35's round-2 trees).
# Measured on the embedded model (60 problems per set): greedy 7 -> 20 on data/arith/dev and 0 -> 4
# on data/handwritten/dev; SBS(3,5) 14 -> 14 and 2 -> 6 (docs/measurements.md, session 36).
FEW_SHOT = [
    (
        "Tom has 3 boxes with 12 apples each. He gives away 7 apples. How many apples are left?",
        "<step>Tom has 3 * 12 apples and gives away 7, so the apples left are 3 * 12 - 7.\n<code>\n"
        "print(3 * 12 - 7)\n</code>\n<output>\n29\n</output>\n</step>\n"
        "<step>The code printed 29. The answer is \\boxed{29}.</step>",
    ),
    (
        "A shirt costs $20 and is on sale for 25% off. What is the sale price in dollars?",
        "<step>The discount is 25% of 20, and the sale price is 20 minus the discount.\n<code>\n"
        "print(20 - 20 * 25 / 100)\n</code>\n<output>\n15.0\n</output>\n</step>\n"
        "<step>The code printed 15.0. The answer is \\boxed{15}.</step>",
    ),
]


def chat_messages(question: str) -> list[dict]:
    """Round-0 conversation: system rules, worked examples, then the question."""
    messages = [{"role": "system", "content": SYSTEM}]
    for q, a in FEW_SHOT:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question})
    return messages


def render_prompt(question: str, tokenizer=None) -> str:
    """The prompt every state starts with; it ends with STEP_OPEN so the model writes a step."""
    messages = chat_messages(question)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "".join(f"{m['role'].upper()}: {m['content']}\n" for m in messages) + "ASSISTANT: "
    return text + STEP_OPEN


@dataclass
class Step:
    """One parsed step. `kind` is "code", "text", "answer" or "malformed"."""

    text: str
    kind: str
    code: str | None = None
    output: str | None = None
    code_error: bool = False
    answer: str | None = None
    reason: str | None = None  # why a step is malformed

    @property
    def terminal(self) -> bool:
        return self.kind in ("answer", "malformed")


_BLOCK_TAGS = (CODE_OPEN, CODE_CLOSE, OUTPUT_OPEN, OUTPUT_CLOSE)


def stray_tag(text: str) -> str | None:
    """A code or output tag in a step's prose: "x = 5.\n</code>" closes a block never opened, and
    "<output>100</output>" invents what only the sandbox may write. Such a step is malformed. Kept as
    text, it made a state the policy imitated (637 of 1732 open text steps in 48 base-model trees of
    make learn's first problems at N=20), and with a zero head its Q of 0 beat every explored sibling,
    so MCTS spent its budget deepening such chains instead of looking for a correct path."""
    return next((t for t in _BLOCK_TAGS if t in text), None)


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
_ANSWER_IS = re.compile(r"(?:final answer|the answer) is[:\s]*", re.I)


def find_answer(text: str) -> str | None:
    """The final answer a step states: \\boxed{}, <answer>, or 'the answer is X' at the end."""
    boxed = boxed_content(text)
    if boxed:
        return boxed
    tags = _ANSWER_TAG.findall(text)
    if tags and tags[-1].strip():
        return tags[-1].strip()
    said = [m.end() for m in _ANSWER_IS.finditer(text)]
    if said:  # the last "the answer is X", X up to the end of its sentence or line, or a tag
        tail = text[said[-1]:].split("\n")[0]
        tail = re.split(r"\.(?:\s|$)|\.?</?[A-Za-z]+>", tail)[0].strip().strip("$").strip()
        tail = re.split(r"(?<![<>!=])=(?!=)", tail)[-1].strip()  # "is 30 + 2 = 32": the result, not the sum
        if tail:
            return tail
    return None


def is_python(code: str) -> bool:
    """Does a code block parse as Python? Parsing only: nothing is compiled to bytecode or run here
    (the sandbox runs code). The small policy often writes its arithmetic in a code block as prose,
    "There are 12 * 3 = 36 boxes" or "3 * 12 = 36". Run, that is a SyntaxError whose traceback
    the next step must read past, and `trainer_svc.examples` drops a path whose every code step
    failed, so a right answer reached that way taught nothing: in session 34's round-1 trees 9 of
    the 35 problems with a correct answer had one only after such a step. Read as the prose step it
    is, the same reasoning is a normal step of a correct path. A deliberate difference from the
    paper's code, which runs every block."""
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: a NUL byte
        return False
    return True


def parse_step(sample: Sample) -> Step:
    """Classify one sampled step. Never raises: anything unusable is a malformed terminal."""
    raw = sample.text or ""
    body = raw[len(STEP_OPEN):] if raw.startswith(STEP_OPEN) else raw
    if sample.finish_reason == "length":
        return Step(body, "malformed", reason="step longer than max_new_tokens")
    if body.rstrip().endswith(CODE_CLOSE) and CODE_OPEN in body:
        head, _, rest = body.rpartition(CODE_OPEN)
        code = rest[: rest.rfind(CODE_CLOSE)].strip("\n")
        if not code.strip():
            return Step(body, "malformed", reason="empty code block")
        if tag := stray_tag(head):
            return Step(body, "malformed", reason=f"{tag} outside a code block")
        thought = head.rstrip() + "\n" if head.strip() else ""
        if is_python(code):
            return Step(thought, "code", code=code)
        body = thought + code.strip() + STEP_CLOSE  # prose: read on as a closed prose step
    text = body[: -len(STEP_CLOSE)] if body.rstrip().endswith(STEP_CLOSE) else body
    text = text.rstrip()
    if STEP_CLOSE in text:
        text = text[: text.index(STEP_CLOSE)]
    answer = find_answer(text)
    if answer is not None:
        return Step(text, "answer", answer=answer)
    if not text.strip():
        return Step(text, "malformed", reason="empty step")
    if sample.finish_reason == "eos":
        return Step(text, "malformed", reason="solution ended without a final answer")
    if tag := stray_tag(text):
        return Step(text, "malformed", reason=f"{tag} outside a code block")
    return Step(text, "text")


def render_step(step: Step) -> str:
    """Text of a finished step as it appears in the state (after the opening <step>)."""
    if step.kind == "code":
        out = (step.output or "")[:MAX_OUTPUT_CHARS]
        return (
            f"{step.text}{CODE_OPEN}\n{step.code}\n{CODE_CLOSE}\n"
            f"{OUTPUT_OPEN}\n{out.rstrip()}\n{OUTPUT_CLOSE}\n{STEP_CLOSE}\n"
        )
    return f"{step.text}{STEP_CLOSE}\n"


def render_state(prompt: str, steps: list[Step]) -> str:
    """The state the value head scores: prompt and finished steps; read at its last token."""
    return prompt + STEP_OPEN.join(render_step(s) for s in steps)


def generation_prefix(prompt: str, steps: list[Step]) -> str:
    """The text the policy continues to write the next step: the state plus an opened step."""
    return render_state(prompt, steps) + (STEP_OPEN if steps else "")
