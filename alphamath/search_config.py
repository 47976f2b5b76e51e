"""Search hyper-parameters, with the paper's defaults."""
from __future__ import annotations

from dataclasses import asdict, dataclass

METHODS = ("greedy", "sbs", "mcts", "majority")
# SBS's sampling temperature where the system evaluates (make learn, the promotion gate). The head barely ranks
# one question's answers (within-question AUC ~0.6), so SBS answers by a vote among its samples, and cooler
# samples are right more often: at the embedded model, 28 of 100 held-out problems against 10 at 0.6 (paired,
# 23 won, 5 lost; greedy 22), 29 against 24 after one round (session 40); chosen in session 37 on 60 fresh
# arithmetic problems at a round-1 checkpoint, 3 seeds: 44, 42, 44 solved at 0.3, 40, 36, 38 at 0.6 (greedy 42).
# MCTS data generation keeps `temperature` (0.6): its coverage needs varied samples. A trained policy is surer: at a
# round-3 checkpoint (session 50) 0.3's 15 root samples made a median of 2 distinct steps, and SBS solved 49 of 100
# at 0.3, 51 at 0.6, 46 at 1.0 (greedy 48); but at rounds 1 and 2, 0.6 solved 36 and 41 against 0.3's 42 and 42.
SBS_TEMPERATURE = 0.3
SELECT_BY = ("q", "value", "visits")


@dataclass
class SearchConfig:
    iterations: int = 40        # MCTS simulations per question
    n_children: int = 5         # sampled next steps per expansion
    temperature: float = 0.6
    top_p: float = 1.0
    max_new_tokens: int = 256   # per step
    c_puct: float = 1.25
    max_depth: int = 8          # steps; a deeper node is a -1 terminal
    max_code_errors: int = 3    # more consecutive code errors than this is a -1 terminal
    beam_b1: int = 3            # SBS: beams kept
    beam_b2: int = 5            # SBS: children per beam
    majority_k: int = 5
    select_by: str = "q"        # how the final MCTS answer is chosen: q | value | visits
    seed: int = 0
    leaves_per_call: int = 1    # MCTS: leaves selected (with a virtual loss) and expanded per model call

    def validate(self) -> "SearchConfig":
        """Raise ValueError with the offending field, so servers can answer INVALID_ARGUMENT."""
        checks = [
            (1 <= self.iterations <= 10_000, "iterations must be in [1, 10000]"),
            (1 <= self.n_children <= 64, "n_children must be in [1, 64]"),
            (0.0 <= self.temperature <= 5.0, "temperature must be in [0, 5]"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (1 <= self.max_new_tokens <= 4096, "max_new_tokens must be in [1, 4096]"),
            (0.0 <= self.c_puct <= 100.0, "c_puct must be in [0, 100]"),
            (1 <= self.max_depth <= 64, "max_depth must be in [1, 64]"),
            (0 <= self.max_code_errors <= 64, "max_code_errors must be in [0, 64]"),
            (1 <= self.beam_b1 <= 64 and 1 <= self.beam_b2 <= 64, "beam widths must be in [1, 64]"),
            (1 <= self.majority_k <= 256, "majority_k must be in [1, 256]"),
            (self.select_by in SELECT_BY, f"select_by must be one of {SELECT_BY}"),
            (1 <= self.leaves_per_call <= 64, "leaves_per_call must be in [1, 64]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        return self

    def to_dict(self) -> dict:
        return asdict(self)
