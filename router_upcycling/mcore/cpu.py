"""CPU compatibility for megatron-core 0.16 (used only when running on CPU; never on GPU).

megatron-core assumes CUDA in a handful of places. Each patch below answers one of them, found
by running GPTModel with an MoE layer forward and backward on CPU with gloo:

- `torch.cuda.current_device()` is used as the target device of freshly built tensors
  (router buffers, RNG tracker, dist-checkpoint loading): answer the CPU device.
- `torch.cuda` RNG state calls (`get_rng_state`, `set_rng_state`, `manual_seed`) are used by
  megatron's model-parallel RNG tracker: map them to the CPU generator.
- `torch.cuda.synchronize` is called by timers and checkpointing: a no-op.
- `moe_utils.te_general_gemm` is left undefined when Transformer Engine is absent
  (NameError inside `router_gating_linear`): set it to None so the torch path runs.

Callers must also build models with `use_cpu_initialization=True`, pass an explicit causal
attention mask (the default one is built with `device="cuda"`), and use the `allgather` token
dispatcher (`alltoall` creates a CUDA stream at construction).
"""
import torch

_enabled = False


def _cpu_device() -> torch.device:
    return torch.device("cpu")


def enable_cpu_mode() -> None:
    """Apply the patches above once per process. Does nothing when CUDA is available."""
    global _enabled
    if _enabled or torch.cuda.is_available():
        return
    torch.cuda.current_device = _cpu_device
    torch.cuda.get_rng_state = lambda device=None: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device=None: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.random.set_rng_state = torch.cuda.set_rng_state

    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    _enabled = True
