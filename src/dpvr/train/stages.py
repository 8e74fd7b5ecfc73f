"""Stage-wise learning rates (the paper's future work (iv)): warm the side branch up at a low rate, then
raise it.

    steps [0, N)      learning_rate x scale (constant)
    steps [N, total)  the run's own schedule (--lr_scheduler_type, its warmup from --warmup_steps,
                      a count or a fraction), laid over the remaining total - N steps as if they were the run

One torch LambdaLR whose factor is `scale` below N and transformers' schedule factor at step - N after
it, so the scheduler state a checkpoint saves (its step count) resumes it exactly, as HF's own do. A
warmup in the second stage starts from 0 as any HF warmup does: pass --warmup_steps 0 (the default) to jump straight
from the low rate to the full one.

    trainer = DPVRTrainer(..., side_warmup=SideWarmup(steps=100, lr_scale=0.1))
"""
from __future__ import annotations

from dataclasses import dataclass

from torch.optim.lr_scheduler import LambdaLR

from dpvr.errors import DPVRError
from dpvr.train.args import check_side_warmup


@dataclass(frozen=True)
class SideWarmup:
    """N (`steps`, >= 1) steps at `lr_scale` (in (0, 1]) times the learning rate, then the run's schedule."""

    steps: int
    lr_scale: float = 0.1

    def __post_init__(self):
        check_side_warmup(self.steps, self.lr_scale)

    def remaining(self, num_training_steps: int) -> int:
        """The second stage's step count; refuses a run no longer than the warm-up."""
        if num_training_steps <= self.steps:
            raise DPVRError(f"side_warmup_steps={self.steps} leaves no step at the raised rate: the run has "
                            f"{num_training_steps} step(s) (raise --max_steps or lower --side-warmup-steps)")  # fmt: skip
        return num_training_steps - self.steps

    def staged(self, second: LambdaLR) -> LambdaLR:
        """One LambdaLR on `second`'s optimizer: `lr_scale` for the first `steps` steps, then `second`'s factors
        (a scheduler made for the remaining steps, e.g. transformers.get_scheduler's) shifted by `steps`."""
        if not isinstance(second, LambdaLR):
            raise DPVRError(f"--side-warmup-steps composes with a step-wise schedule; {type(second).__name__} is not one "
                            "(use --lr_scheduler_type cosine, linear, constant, ...)")  # fmt: skip
        # the second scheduler set each group's initial_lr (the configured rate): this one reads it back
        return LambdaLR(second.optimizer, [self._factor(f) for f in second.lr_lambdas])

    def _factor(self, after):
        n, scale = self.steps, self.lr_scale

        # a plain function: LambdaLR's state_dict saves none of it (only its step count), so a resumed run
        # rebuilds it from the flags and loads the count, as with transformers' own schedules
        def factor(step: int) -> float:
            return scale if step < n else after(step - n)

        return factor
