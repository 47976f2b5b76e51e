"""joint_loss on hand-computed tensors; collate's label and value masks against inference tokenization."""
from __future__ import annotations

import math

import pytest
import torch

from alphamath.steps import STEP_OPEN
from trainer_svc.loss import IGNORE, collate, joint_loss, lm_positions, policy_value_pass

PROMPT = "<|im_start|>user\nWhat is 3 * 12 - 7?<|im_end|>\n<|im_start|>assistant\n<step>"
STEPS = [
    "First multiply.\n<code>\nprint(3 * 12)\n</code>\n<output>\n36\n</output>\n</step>\n",
    "Then 36 - 7 = 29. The answer is \\boxed{29}.</step>\n",
]


def _batch(labels, targets, mask):
    return {"labels": torch.tensor([labels]), "value_targets": torch.tensor([targets]),
            "value_mask": torch.tensor([mask])}


def _at_labels(logits, batch):
    """Full [B, T, V] logits cut to joint_loss's rows (what policy_value_pass computes)."""
    return logits[:, :-1][lm_positions(batch)]


def test_joint_loss_hand_computed():
    # vocab 2; logits at t predict the label at t+1. Only the token at t=1 is labelled (id 1),
    # predicted by logits[0] = [0, ln 3] -> p = 3/4.
    logits = torch.tensor([[[0.0, math.log(3)], [5.0, -5.0], [1.0, 2.0]]])
    values = torch.tensor([[0.5, 0.0, -0.5]])
    batch = _batch([IGNORE, 1, IGNORE], [0.9, 1.0, 0.0], [0, 1, 1])
    out = joint_loss(_at_labels(logits, batch), values, batch, alpha=0.1)
    lm = -math.log(0.75)
    value = ((0.0 - 1.0) ** 2 + (-0.5 - 0.0) ** 2) / 2  # position 0 is masked out
    assert out.lm_loss.item() == pytest.approx(lm, rel=1e-6)
    assert out.value_loss.item() == pytest.approx(value, rel=1e-6)
    assert out.loss.item() == pytest.approx(lm + 0.1 * value, rel=1e-6)


def test_joint_loss_averages_over_labelled_tokens_and_rows():
    logits = torch.zeros(2, 3, 4)  # uniform: every labelled token costs ln 4
    values = torch.zeros(2, 3)
    batch = {"labels": torch.tensor([[IGNORE, 1, 2], [IGNORE, IGNORE, 3]]),
             "value_targets": torch.tensor([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]),
             "value_mask": torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])}
    out = joint_loss(_at_labels(logits, batch), values, batch, alpha=1.0)
    assert out.lm_loss.item() == pytest.approx(math.log(4))
    assert out.value_loss.item() == pytest.approx(1.0)


def test_only_wrong_paths_gives_zero_lm_loss_and_value_gradient():
    logits = torch.randn(1, 3, 5, requires_grad=True)
    values = torch.tensor([[0.2, 0.4, 0.6]], requires_grad=True)
    batch = _batch([IGNORE] * 3, [0.0, 0.0, -1.0], [0, 0, 1])
    out = joint_loss(_at_labels(logits, batch), values, batch, alpha=0.5)
    assert out.lm_loss.item() == 0.0 and not torch.isnan(out.loss)
    out.loss.backward()
    # d/dv of 0.5 * (v - t)^2 at the one masked-in position = 0.5 * 2 * (0.6 + 1)
    assert values.grad.tolist()[0] == pytest.approx([0.0, 0.0, 1.6])
    assert torch.count_nonzero(logits.grad) == 0


def test_collate_masks_match_what_the_policy_wrote_and_where_inference_reads_values(tiny_tokenizer):
    examples = [{"prompt": PROMPT, "steps": STEPS, "q_values": [0.3, 1.0], "correct": True},
                {"prompt": PROMPT, "steps": STEPS[:1], "q_values": [-0.4], "correct": False}]
    b = collate(examples, tiny_tokenizer, max_len=512)
    tok = lambda s: tiny_tokenizer(s, add_special_tokens=False)["input_ids"]
    full = tok(PROMPT + STEP_OPEN.join(STEPS))
    assert b["input_ids"][0].tolist() == full and b["attention_mask"][0].sum() == len(full)
    assert b["attention_mask"][1].sum() == len(tok(PROMPT + STEPS[0]))
    # value read at the last token of each state, as LocalLM.score(state) does
    states = [PROMPT + STEPS[0], PROMPT + STEPS[0] + STEP_OPEN + STEPS[1]]
    assert torch.nonzero(b["value_mask"][0]).flatten().tolist() == [len(tok(s)) - 1 for s in states]
    assert b["value_targets"][0][b["value_mask"][0] > 0].tolist() == pytest.approx([0.3, 1.0])
    assert torch.nonzero(b["value_mask"][1]).flatten().tolist() == [len(tok(states[0])) - 1]
    assert b["value_targets"][1][b["value_mask"][1] > 0].tolist() == pytest.approx([-0.4])
    # LM labels: the correct path's solution tokens minus the engine-written output block
    labelled = tiny_tokenizer.decode([t for t in b["labels"][0].tolist() if t != IGNORE])
    assert labelled == ("First multiply.\n<code>\nprint(3 * 12)\n</code>" + STEP_OPEN + STEPS[1])
    assert (b["labels"][1] == IGNORE).all()  # wrong paths train the value head only
    assert (b["labels"][0][:len(tok(PROMPT))] == IGNORE).all()


def test_collate_truncates_and_drops_states_beyond_max_len(tiny_tokenizer):
    ex = {"prompt": PROMPT, "steps": STEPS, "q_values": [0.3, 1.0], "correct": True}
    cut = len(tiny_tokenizer(PROMPT + STEPS[0], add_special_tokens=False)["input_ids"]) + 3
    b = collate([ex], tiny_tokenizer, max_len=cut)
    assert b["input_ids"].shape == (1, cut)
    assert b["value_mask"].sum() == 1 and b["value_targets"][0][b["value_mask"][0] > 0].tolist() == pytest.approx([0.3])


def test_value_weights_make_the_value_loss_a_weighted_mean(tiny_tokenizer):
    """A correct path weighing 3 against one wrong path: the value term is (3 e1 + e2) / 4 per step end."""
    examples = [{"prompt": PROMPT, "steps": STEPS[:1], "q_values": [1.0], "correct": True},
                {"prompt": PROMPT, "steps": STEPS[:1], "q_values": [-1.0], "correct": False}]
    b = collate(examples, tiny_tokenizer, max_len=512, value_weights=[3.0, 1.0])
    assert b["value_mask"][0].sum() == 3.0 and b["value_mask"][1].sum() == 1.0
    values = torch.zeros(b["value_mask"].shape)  # a zero head: squared error 1 on both rows
    values[0][b["value_mask"][0] > 0] = 0.5     # row 0 off by 0.5: squared error 0.25
    jl = joint_loss(torch.zeros(0, 8), values, {**b, "labels": torch.full_like(b["labels"], IGNORE)})
    assert jl.value_loss.item() == pytest.approx((3 * 0.25 + 1 * 1.0) / 4)
    with pytest.raises(ValueError, match="2 value weights for 1 examples"):
        collate(examples[:1], tiny_tokenizer, 512, value_weights=[1.0, 1.0])


def test_balanced_value_weights():
    from trainer_svc.train import value_weights
    ex = [type("E", (), {"correct": c})() for c in (True, False, False, False)]
    assert value_weights(ex, balance=True) == [3.0, 1.0, 1.0, 1.0]
    assert value_weights(ex, balance=False) == [1.0] * 4
    assert value_weights(ex[1:], balance=True) == [1.0] * 3  # no correct path: nothing to balance


def test_collate_rejects_bad_examples(tiny_tokenizer):
    with pytest.raises(ValueError, match="one Q value per step"):
        collate([{"prompt": "p", "steps": ["a</step>\n"], "q_values": [], "correct": True}], tiny_tokenizer, 64)
    with pytest.raises(ValueError, match="at least one example"):
        collate([], tiny_tokenizer, 64)


def test_collate_accepts_trainer_examples_and_trains_end_to_end(tiny_model_dir, tiny_tokenizer):
    from alphamath.model import ValueHeadModel
    from trainer_svc.examples import Example

    ex = Example(question_id="q", prompt=PROMPT, steps=tuple(STEPS), values=(0.5, 1.0), correct=True)
    b = collate([ex], tiny_tokenizer, max_len=256)
    model = ValueHeadModel.from_pretrained(tiny_model_dir, dtype="fp32").train()
    loss = joint_loss(*policy_value_pass(model, b), b)
    loss.loss.backward()
    assert torch.isfinite(loss.loss) and loss.lm_loss > 0 and loss.value_loss > 0
    assert model.value_head.weight.grad.abs().sum() > 0  # zero-init head still gets gradient
    # the LM head at labelled positions only is the same loss as over full logits
    with torch.no_grad():
        out = model(b["input_ids"], attention_mask=b["attention_mask"])
        full = torch.nn.functional.cross_entropy(out.logits[0, :-1], b["labels"][0, 1:], ignore_index=IGNORE)
    assert loss.lm_loss.item() == pytest.approx(full.item(), rel=1e-5)
    with pytest.raises(ValueError, match="logits rows for"):
        joint_loss(out.logits[0], out.values, b)


def test_a_shared_prefix_computed_once_gives_the_full_passs_loss_and_gradients(tiny_model_dir, tiny_tokenizer):
    """Rows that start alike compute the common tokens once (trunk_pass); rows of unequal length
    (right padding) and a wrong path among correct ones; loss and every gradient as the plain pass."""
    from alphamath.model import ValueHeadModel
    from alphamath.steps import render_prompt
    from trainer_svc.examples import Example
    from trainer_svc.loss import MIN_SHARED, shared_prefix

    exs = [Example("a", render_prompt("What is 3 * 12 - 7?"), tuple(STEPS), (0.5, 1.0), True),
           Example("b", render_prompt("A pen costs 4 dollars. How much do 5 pens cost?"),
                   ("Five pens cost 5 * 4 = 20. The answer is \\boxed{20}.</step>\n",), (-1.0,), False),
           Example("c", render_prompt("What is 2 + 2?"), ("2 + 2 = 4. The answer is \\boxed{4}.</step>\n",), (1.0,), True)]
    b = collate(exs, tiny_tokenizer, max_len=1024, value_weights=[1.0, 2.0, 1.0])
    n = shared_prefix(b)
    assert n >= MIN_SHARED and (b["input_ids"][:, :n] == b["input_ids"][:1, :n]).all()
    assert not (b["input_ids"][:, n] == b["input_ids"][0, n]).all()
    model = ValueHeadModel.from_pretrained(tiny_model_dir, dtype="fp32").train()
    with torch.no_grad():  # a head that is not zero, so the value term's gradient reaches the trunk
        model.value_head.weight.normal_(0, 0.05)
    runs = []
    for share in (False, True):
        model.zero_grad()
        loss = joint_loss(*policy_value_pass(model, b, share=share), b)
        loss.loss.backward()
        runs.append((loss, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (plain, g0), (shared, g1) = runs
    assert shared.lm_loss.item() == pytest.approx(plain.lm_loss.item(), rel=1e-5)
    assert shared.value_loss.item() == pytest.approx(plain.value_loss.item(), rel=1e-5, abs=1e-7)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for k in g0:
        assert torch.allclose(g1[k], g0[k], rtol=1e-3, atol=1e-6), k
    assert shared_prefix(collate(exs[:1], tiny_tokenizer, 1024)) == 0  # one row: nothing to share
