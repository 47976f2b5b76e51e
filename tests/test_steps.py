"""Step parsing never crashes; malformed output becomes a terminal; rendering round-trips."""
import pytest

from alphamath.answer import boxed_content
from alphamath.interfaces import Sample
from alphamath.steps import (STEP_OPEN, Step, find_answer, generation_prefix, parse_step, render_prompt,
                             render_state)


def s(text, finish="stop"):
    return Sample(text=text, token_count=3, cumulative_logprob=-1.0, finish_reason=finish)


@pytest.mark.parametrize("text,finish,kind,extra", [
    ("Add them.\n<code>\nprint(2+3)\n</code>", "stop", "code", {"code": "print(2+3)", "text": "Add them.\n"}),
    ("First, 3 * 4 = 12.</step>", "stop", "text", {"text": "First, 3 * 4 = 12."}),
    ("So the total is \\boxed{\\frac{1}{2}}.</step>", "stop", "answer", {"answer": "\\frac{1}{2}"}),
    ("The answer is <answer>42</answer>", "eos", "answer", {"answer": "42"}),
    ("Therefore, the answer is 17.", "eos", "answer", {"answer": "17"}),
    ("The answer is 7. The answer is 7", "eos", "answer", {"answer": "7"}),
    ("So the final answer is $3.5$.</step>", "stop", "answer", {"answer": "3.5"}),
    ("I think we should", "eos", "malformed", {}),
    ("blah " * 50, "length", "malformed", {}),
    ("", "eos", "malformed", {}),
    ("</step>", "stop", "malformed", {}),
    ("Run:\n<code>\n\n</code>", "stop", "malformed", {}),
    ("\\boxed{unbalanced", "eos", "malformed", {}),
    ("<step><step></code></output>\\boxed{}", "eos", "malformed", {}),
    # a code or output tag in prose: a block closed that was never opened, an output the sandbox never wrote
    ("Ali has 2 bags of 8 cards each.\n</code>", "stop", "malformed", {"reason": "</code> outside a code block"}),
    ("The total is 5 * 10 = 50.\n<output>\n100\n</output></step>", "stop", "malformed", {}),
    ("So it takes 10 minutes.\n</output></step>", "stop", "malformed", {"reason": "</output> outside a code block"}),
    ("It printed <output>\n9\n</output>\nNow add.\n<code>\nprint(9+1)\n</code>", "stop", "malformed", {}),
    # prose in a code block (not Python) is read as the prose step it is, never sent to the sandbox
    ("Find the total.\n<code>\nThere are 12 * 3 = 36 boxes\n</code>", "stop", "text",
     {"text": "Find the total.\nThere are 12 * 3 = 36 boxes", "code": None}),
    ("<code>\n3 * 12 = 36\n</code>", "stop", "text", {"text": "3 * 12 = 36", "code": None}),
    ("So:\n<code>\nThe answer is \\boxed{36}.\n</code>", "stop", "answer", {"answer": "36", "code": None}),
    ("Count.\n<code>\nx = 3 * 12\nprint(x)\n</code>", "stop", "code", {"code": "x = 3 * 12\nprint(x)"}),
    ("Count.\n<code>\nprint(1)\x00\n</code>", "stop", "text", {"code": None}),
    # an answer stays an answer: it is judged by its value, not its form
    ("<output>So the answer is 300.</output>", "eos", "answer", {"answer": "300"}),
])
def test_parse_step(text, finish, kind, extra):
    step = parse_step(s(text, finish))
    assert step.kind == kind
    for k, v in extra.items():
        assert getattr(step, k) == v
    assert step.terminal == (kind in ("answer", "malformed"))


def test_parse_never_raises_on_garbage():
    import random
    rng = random.Random(0)
    alphabet = ["<step>", "</step>", "<code>", "</code>", "\\boxed{", "}", "{", "x", "\n", "answer is "]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        parse_step(s(text, rng.choice(["stop", "eos", "length"])))


def test_boxed_nested_braces():
    assert boxed_content("x \\boxed{\\frac{a}{b}} y \\boxed{\\sqrt{2}}") == "\\sqrt{2}"
    assert find_answer("no answer here") is None
    assert find_answer("<output>So the answer is 300.</output>") == "300"  # seen from SmolLM2
    assert find_answer("So the answer is 30 + 2 = 32.") == "32"  # seen from SmolLM2
    assert find_answer("The answer is x <= 5.") == "x <= 5"  # an inequality is not a sum
    assert find_answer("The answer is x < 5.</step>") == "x < 5"


def test_state_and_prefix_rendering():
    prompt = render_prompt("What is 2+3?")
    assert prompt.endswith(STEP_OPEN) and "What is 2+3?" in prompt and "\\boxed{29}" in prompt
    code = Step("Add.\n", "code", code="print(2+3)", output="5\n")
    text = Step("So 5.", "text")
    state = render_state(prompt, [code, text])
    assert state == prompt + "Add.\n<code>\nprint(2+3)\n</code>\n<output>\n5\n</output>\n</step>\n" \
        + STEP_OPEN + "So 5.</step>\n"
    assert generation_prefix(prompt, [code, text]) == state + STEP_OPEN
    assert generation_prefix(prompt, []) == prompt == render_state(prompt, [])


def test_prose_in_a_code_block_renders_as_a_prose_step():
    """The state the next step continues from shows the prose, not a traceback."""
    step = parse_step(s("Find the total.\n<code>\nThere are 12 * 3 = 36 boxes\n</code>"))
    assert render_state("Q<step>", [step]) == "Q<step>Find the total.\nThere are 12 * 3 = 36 boxes</step>\n"
