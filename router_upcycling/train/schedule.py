"""Learning-rate and weight-decay schedule: megatron-core's OptimizerParamScheduler plus the paper's step decay.

Step style (paper, section 4.1): linear warmup from 0 to the peak rate, constant, then the rate is
multiplied by `factor` at each decay point (fractions of the training steps), never below min_lr.
"""
import math
from typing import Sequence

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from router_upcycling.train.config import TrainingConfig


class StepDecayParamScheduler(OptimizerParamScheduler):
    """OptimizerParamScheduler with `lr_decay_style="step"`; other styles are megatron-core's."""

    def __init__(self, optimizer, *, decay_points: Sequence[int], decay_factor: float, **kwargs) -> None:
        # read by get_lr(), which the base constructor calls
        self.decay_points = sorted(decay_points)
        self.decay_factor = decay_factor
        super().__init__(optimizer, **kwargs)

    def get_lr(self, param_group: dict) -> float:
        if self.lr_decay_style != "step":
            return super().get_lr(param_group)
        max_lr = param_group.get("max_lr", self.max_lr)
        min_lr = param_group.get("min_lr", self.min_lr)
        if self.lr_warmup_steps > 0 and self.num_steps <= self.lr_warmup_steps:
            return self.init_lr + (max_lr - self.init_lr) * self.num_steps / self.lr_warmup_steps
        decays = sum(self.num_steps >= point for point in self.decay_points)
        return max(min_lr, max_lr * self.decay_factor**decays)


def build_scheduler(config: TrainingConfig, optimizer) -> StepDecayParamScheduler:
    """The schedule of the flags; step() is called once per optimizer step (iteration-based, as Megatron-LM)."""
    warmup = config.warmup_iters
    return StepDecayParamScheduler(
        optimizer,
        decay_points=[math.ceil(f * config.train_iters) for f in config.lr_step_decay_fractions],
        decay_factor=config.lr_step_decay_factor,
        init_lr=0.0,
        max_lr=config.lr,
        min_lr=config.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(config.train_iters, warmup + 1),
        lr_decay_style=config.lr_decay_style,
        start_wd=config.weight_decay,
        end_wd=config.weight_decay,
        wd_incr_steps=config.train_iters,
        wd_incr_style="constant",
    )
