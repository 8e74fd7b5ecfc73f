"""Has a run's held-out loss stopped falling? One rule, used both to stop training early
(`dpvr train --stop-at-plateau`) and to judge a finished run (`dpvr reproduce` marks the rows that did not).

The held-out set is fixed, so its loss moves only with the weights: a small relative drop over the last
part of training means more steps buy little.
"""
from __future__ import annotations

from transformers import TrainerCallback

PLATEAU_TAIL = 1 / 3  # the last third of the steps so far ...
PLATEAU_DROP = 0.02  # ... may lower the held-out loss by at most 2% (relative) for a run to count as converged
MIN_POINTS = 4  # held-out evaluations before early stopping may trigger (3 suffice to judge a finished run)


def held_out_curve(log_history: list[dict]) -> list[tuple[int, float]]:
    """(step, held-out loss) pairs from a Trainer's log history."""
    return [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]


def plateau(curve: list[tuple[int, float]], tail: float = PLATEAU_TAIL, tol: float = PLATEAU_DROP) -> dict:
    """curve: (step, held-out loss) in step order. Converged when the loss fell by at most `tol` (relative)
    over the last `tail` of the steps."""
    if len(curve) < 3:
        return {"plateaued": False, "drop": None, "why": f"{len(curve)} held-out points (need 3)"}
    last_step = curve[-1][0]
    start = next(loss for step, loss in curve if step >= last_step * (1 - tail))
    drop = (start - curve[-1][1]) / start
    return {"plateaued": drop <= tol, "drop": drop,
            "why": f"held-out loss fell {100 * drop:.1f}% over the last {tail:.0%} of training (limit {100 * tol:.0f}%)"}  # fmt: skip


class PlateauStop(TrainerCallback):
    """Ends training at the first held-out evaluation (from the MIN_POINTS-th on, and from step
    `min_steps` on) where `plateau` holds."""

    stopped = False

    def __init__(self, min_steps: int = 0):
        self.min_steps = min_steps

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        curve = held_out_curve(state.log_history)  # the Trainer logs the evaluation before this callback
        if len(curve) >= MIN_POINTS and state.global_step >= self.min_steps and plateau(curve)["plateaued"]:
            control.should_training_stop = True
            self.stopped = True
        return control
