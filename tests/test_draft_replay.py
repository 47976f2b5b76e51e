"""The draft replay's arithmetic on a hand-built sample (tests/draft_replay.py)."""
from tests.draft_replay import RULES, replay


def test_a_sample_that_repeats_its_prompt_is_accepted_whole_and_a_cut_rule_pays_a_step_per_token():
    prompt, sample = [5, 6, 7, 8, 9], [5, 6, 7, 8, 9]
    # The prefill samples 5; the 1-gram (5,) matches position 0 with reach 1, and drafts 6 7 8 9: all kept.
    four = replay([(prompt, sample)], RULES["4 tokens (the engine's longest)"], row_cost=0.1)
    assert four == {"tokens_per_step": 5 / 2, "rejected_per_token": 0.0, "cost_per_token": (1 + 1.4) / 5,
                    "generated": 5}
    none = replay([(prompt, sample)], RULES["no drafts"], row_cost=0.1)
    assert none == {"tokens_per_step": 5 / 5, "rejected_per_token": 0.0, "cost_per_token": 1.0, "generated": 5}
    # The cut rule drafts only once the match reaches 4 tokens back: after 5 6 7 8, its one token 9 is
    # kept, but it is the sample's last, so that step still gains one token.
    cut = replay([(prompt, sample)], RULES["m >= 4: 1, m >= 8: 2, m >= 16: 4 (the engine's, lookup.draft_cut)"], 0.1)
    assert cut == {"tokens_per_step": 1.0, "rejected_per_token": 0.0, "cost_per_token": (4 + 1.1) / 5,
                   "generated": 5}


def test_rejected_draft_positions_are_counted():
    prompt, sample = [1, 2, 3], [1, 4, 4]
    # After 1 (from the prefill) the 1-gram (1,) drafts what followed it: 2 3 1. 4 is sampled instead:
    # 3 positions rejected. (4,) never occurred before: no draft, one more step.
    r = replay([(prompt, sample)], RULES["4 tokens (the engine's longest)"], row_cost=0.0)
    assert r["rejected_per_token"] == 3 / 3
    assert r["tokens_per_step"] == 3 / 3
