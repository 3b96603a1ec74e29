"""Router Upcycling on Megatron-LM's own trainer (`megatron.training`, in megatron-core's wheel from 0.17).

- `python -m router_upcycling.megatron_lm`: Megatron-LM's `pretrain()` loop on one of our checkpoints: its flags
  unchanged, the architecture flags taken from the checkpoint, our router through the layer spec, our routing
  health in its TensorBoard / W&B logs (docs/cluster.md, "Already on Megatron-LM?").
- `--spec router_upcycling.megatron_lm.spec layer_spec`: the same layer spec for a user's own `pretrain_gpt.py`.
- `flags`: the Megatron-LM flags of a checkpoint and the `args` namespace Megatron-LM keeps in its checkpoints.

Imports megatron-core, megatron.training and the megatron glue; `flags` imports neither.
"""
