"""megatron-core 0.16's DistributedOptimizer checkpoints with torch's Adam as the inner optimizer.

Without Transformer Engine or Apex (every CPU run, and GPU images without them) megatron-core falls
back to `torch.optim.Adam`, which keeps Adam's step count per parameter; Transformer Engine's FusedAdam,
which Megatron-LM's GPU runs use, keeps it in the parameter groups. Loading a distributed-optimizer
checkpoint then goes wrong in three places, each answered here (all no-ops with FusedAdam):

1. `DistributedOptimizer.state_dict()`, called while building the sharded state dict for loading, reads
   the step count from the per-parameter state, which is empty before the first step (AssertionError).
   `before_loading` fills it the way megatron-core does for its FSDP checkpoints
   (`_init_optimizer_states_with_dummy_values`: one step with zero gradients; loading replaces every value).
2. `_set_main_param_and_optimizer_states` copies every key of the live state, `step` included, from the
   loaded tensors; the `fully_reshardable` format has no `step` there (KeyError). The patch keeps the
   live count, which (3) then sets.
3. `load_state_dict()` restores the count into the parameter groups, then gives every parameter one
   shared step tensor and overwrites it with the count from before loading. Adam's bias correction would
   restart, and the shared tensor would advance once per parameter per step. `after_loading` gives each
   parameter its own count again, from its group.
"""
import functools

import torch


def _uses_torch_adam() -> bool:
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def _distributed_parts(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [part for part in getattr(optimizer, "chained_optimizers", [optimizer]) if isinstance(part, DistributedOptimizer)]


def _keep_live_step(set_states):
    @functools.wraps(set_states)
    def set_main_param_and_optimizer_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        live = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        if "step" in live and "step" not in tensors:
            tensors = {**tensors, "step": live["step"]}
        return set_states(self, model_param, tensors)

    set_main_param_and_optimizer_states.patched = True
    return set_main_param_and_optimizer_states


def before_loading(optimizer) -> None:
    if not _uses_torch_adam():
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if not getattr(DistributedOptimizer._set_main_param_and_optimizer_states, "patched", False):
        DistributedOptimizer._set_main_param_and_optimizer_states = _keep_live_step(
            DistributedOptimizer._set_main_param_and_optimizer_states)
    for part in _distributed_parts(optimizer):
        if not part.optimizer.state:
            part._init_optimizer_states_with_dummy_values()


def after_loading(optimizer) -> None:
    if not _uses_torch_adam():
        return
    for part in _distributed_parts(optimizer):
        for group in part.optimizer.param_groups:
            for param in group["params"]:
                param_state = part.optimizer.state.get(param, {})
                if "step" in param_state and "step" in group:
                    param_state["step"] = torch.tensor(float(group["step"]))
