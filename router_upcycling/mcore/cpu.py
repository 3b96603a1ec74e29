"""CPU compatibility for megatron-core (used only when CUDA is absent; never on GPU).

The training path is megatron-core's own on every device (DistributedDataParallel, the (distributed)
optimizer, `get_forward_backward_func()`, `finalize_model_grads`). megatron-core assumes CUDA in the
places below; each patch answers one of them. On a machine without CUDA none of these calls could
succeed, so redirecting them to the host changes nothing that could run before.

1. `torch.cuda.current_device()` names the device of freshly built tensors (router buffers,
   `param_and_grad_buffer.py`'s grad buffers, `p2p_communication.py`'s receive buffers, mappings in
   `tensor_parallel/`, dist-checkpoint loading): answer the CPU device.
2. Literal `device="cuda"` in tensor factories of these modules: `optimizer/optimizer.py` (found_inf,
   overflow buffer, unit scale), `optimizer/grad_scaler.py`, `optimizer/clip_grads.py` (grad-norm
   buffers), `pipeline_parallel/schedules.py` (token counter), `distributed/param_and_grad_buffer.py`,
   `transformer/moe/moe_utils.py` (aux-loss tracker), `transformer/utils.py` (default attention mask),
   `rerun_state_machine.py`, `utils.py` (the local multi-tensor grad norm), `tensor_parallel/data.py`, `dist_checkpointing/strategies/state_dict_saver.py`
   and `dist_checkpointing/exchange_utils.py`: their module-level name `torch` becomes a view of torch
   whose `tensor`, `zeros`, `ones`, `empty`, `empty_like` and `full` build on the host when asked for
   "cuda". Only there: replacing torch's own functions breaks transformers' meta-device initialisation,
   and a TorchFunctionMode is thread-local (the autograd engine runs backward hooks without it).
3. `Tensor.cuda()` (`optimizer/optimizer.py` load_state_dict, `distrib_optimizer.py` parameter-state
   exchange): the identity.
4. `param.type()` compared with 'torch.cuda.FloatTensor' / 'torch.cuda.BFloat16Tensor' where the
   mixed-precision optimizers sort parameters into fp32 and 16-bit groups
   (`Float16OptimizerWithFloat16Params.__init__`, `DistributedOptimizer.__init__`) and where
   `clip_grads.clip_grad_by_total_norm_fp32` asserts float32 gradients: during those calls only,
   `Tensor.type()` answers the CUDA name of the tensor's type.
5. RNG: megatron's model-parallel RNG tracker (`tensor_parallel/random.py`) reads and sets the "CUDA"
   generator. `torch.cuda.{get,set}_rng_state` / `manual_seed` and the tracker's own
   `_get_cuda_rng_state` / `_set_cuda_rng_state` act on the CPU generator. The stock
   `_set_cuda_rng_state` queues a closure with `torch.cuda._lazy_call` at every `fork()`; without CUDA
   that queue is never drained (a host-memory leak of about 16 MB per step on a tiny model) and the
   generator is never set. The tracker's "CPU RNG state changed within GPU RNG context" warning is
   silenced: on CPU the forked generator is the CPU generator, so it always changes.
6. Streams and events (`transformer/moe/token_dispatcher.py`'s alltoall dispatcher keeps a
   device-to-host stream; `distributed/param_and_grad_buffer.py` a communication stream): host work is
   ordered already, so `torch.cuda.Stream` / `Event` / `stream()` / `current_stream()` /
   `default_stream()` are stand-ins that do nothing. `torch.cuda.synchronize` and `empty_cache` are
   no-ops.
7. The alltoall dispatcher (`transformer/moe/token_dispatcher.py`) brings its split sizes to the host
   with `moe_utils.maybe_move_tensor_to_cpu(..., as_numpy=True)`, which converts only CUDA tensors;
   `all_to_all_single` then receives tensors where it takes sequences of ints. On the host the
   helper returns the NumPy array the GPU path returns.
8. `moe_utils.te_general_gemm` is left undefined without Transformer Engine (NameError inside
   `router_gating_linear`): set it to None so the torch path runs.

Megatron-LM's training layer (`megatron.training`, run by router_upcycling.megatron_lm) needs three more,
T1-T3, applied by `enable_training_layer()` (see there).

Gloo runs the collectives (`all_reduce`, `reduce_scatter_tensor`, `all_gather_into_tensor`,
`all_to_all_single`, point-to-point). Options that need CUDA kernels (Transformer Engine, grouped GEMM)
are refused up front: `unsupported_on_cpu()`.
"""
import contextlib
import functools
import importlib
import logging
import types

import torch

_enabled = False
_FACTORIES = ("tensor", "zeros", "ones", "empty", "empty_like", "full")
_MODULES_WITH_CUDA_FACTORIES = (
    "megatron.core.optimizer.optimizer", "megatron.core.optimizer.grad_scaler", "megatron.core.optimizer.clip_grads",
    "megatron.core.pipeline_parallel.schedules", "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.transformer.moe.moe_utils", "megatron.core.transformer.utils", "megatron.core.rerun_state_machine",
    "megatron.core.tensor_parallel.data", "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils", "megatron.core.utils",
)


def _names_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int)  # a bare index names an accelerator


class _TorchBuildingOnHost(types.ModuleType):
    """torch, except that the factories above build on the host when asked for "cuda"."""

    def __init__(self) -> None:
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _build_on_host(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


def _build_on_host(factory):
    @functools.wraps(factory)
    def build(*args, **kwargs):
        if _names_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return build


@contextlib.contextmanager
def _cuda_type_names():
    host_type = torch.Tensor.type

    def cuda_type(self, *args, **kwargs):
        if args or kwargs:
            return host_type(self, *args, **kwargs)
        return host_type(self).replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = cuda_type
    try:
        yield
    finally:
        torch.Tensor.type = host_type


def _with_cuda_type_names(constructor):
    @functools.wraps(constructor)
    def construct(*args, **kwargs):
        with _cuda_type_names():
            return constructor(*args, **kwargs)

    return construct


class _HostStream:
    """Stands in for torch.cuda.Stream and torch.cuda.Event: host work is already in order."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None) -> "_HostStream":
        return _HostStream()

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __eq__(self, other) -> bool:
        return isinstance(other, _HostStream)

    __hash__ = object.__hash__


_HOST_STREAM = _HostStream()


def _host_tensor_as_numpy(tensor, as_numpy: bool = False, record_stream: bool = False):
    if as_numpy and torch.is_tensor(tensor):
        return tensor.numpy()
    return tensor


class _SilenceForkWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def enable_cpu_mode() -> None:
    """Apply the patches above once per process. Does nothing when CUDA is available."""
    global _enabled
    if _enabled or torch.cuda.is_available():
        return
    # 1
    torch.cuda.current_device = lambda: torch.device("cpu")
    # 2
    torch_on_host = _TorchBuildingOnHost()
    for module_name in _MODULES_WITH_CUDA_FACTORIES:
        importlib.import_module(module_name).torch = torch_on_host
    # 3
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    # 4
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for cls in (DistributedOptimizer, optimizer.Float16OptimizerWithFloat16Params):
        cls.__init__ = _with_cuda_type_names(cls.__init__)
    clip_grads.clip_grad_by_total_norm_fp32 = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    optimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32  # imported by name there
    # 5
    from megatron.core.tensor_parallel import random as model_parallel_random

    torch.cuda.get_rng_state = lambda device=None: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device=None: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.random.set_rng_state = torch.cuda.set_rng_state
    model_parallel_random._get_cuda_rng_state = lambda device=None, clone=False, graph_safe=False: torch.get_rng_state()
    model_parallel_random._set_cuda_rng_state = lambda new_state, device=None, graph_safe=False: torch.set_rng_state(new_state)
    logging.getLogger(model_parallel_random.__name__).addFilter(_SilenceForkWarning())
    # 6
    torch.cuda.Stream = torch.cuda.Event = _HostStream
    torch.cuda.current_stream = torch.cuda.default_stream = lambda device=None: _HOST_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.empty_cache = lambda: None
    # 7
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    token_dispatcher.maybe_move_tensor_to_cpu = moe_utils.maybe_move_tensor_to_cpu = _host_tensor_as_numpy
    # 8
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    _enabled = True


# flag -> why it cannot run without CUDA (checked by the training entry point before anything starts)
CUDA_ONLY_OPTIONS = {
    "transformer_impl": ("transformer_engine", "Transformer Engine kernels need CUDA; use --transformer-impl local"),
    "moe_grouped_gemm": (True, "grouped GEMM kernels need CUDA; drop --moe-grouped-gemm"),
}


def unsupported_on_cpu(settings: dict) -> list:
    """One message per setting in `settings` (flag destination -> value) that needs CUDA."""
    return [reason for name, (value, reason) in CUDA_ONLY_OPTIONS.items() if settings.get(name) == value]


class _CudaPresent(types.ModuleType):
    """torch.cuda, except that it reports one device (and setting it does nothing): see T1 below."""

    def __init__(self) -> None:
        super().__init__("torch.cuda")
        self.is_available = lambda: True
        self.device_count = lambda: 1
        self.set_device = lambda device: None

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchWithCuda(_TorchBuildingOnHost):
    """torch building on the host (patch 2), whose `cuda` reports a device (T1)."""

    def __init__(self) -> None:
        super().__init__()
        self.cuda = _CudaPresent()


# Megatron-LM's training layer (megatron-core >= 0.17), for router_upcycling.megatron_lm:
_TRAINING_MODULES_WITH_CUDA_FACTORIES = (
    "megatron.training.training", "megatron.training.checkpointing", "megatron.training.utils.common_utils",
)


def enable_training_layer() -> None:
    """The patches above, and these for Megatron-LM's training layer (`megatron.training`), which
    router_upcycling.megatron_lm runs. Does nothing when CUDA is available.

    T1. `initialize.py`: `initialize_megatron` asserts "Megatron requires CUDA." (`pretrain()` never passes
        `allow_no_cuda`), and `_initialize_distributed` / `_set_random_seed` create the model-parallel groups and
        seed the model-parallel RNG tracker only when `torch.cuda.device_count() > 0`. That module's `torch` becomes
        a view whose `cuda` reports one device and ignores `set_device` (the process group is gloo's: the device id
        it computes is not passed to it).
    T2. Literal `device='cuda'` in tensor factories of `training.py` (start-time and loss all-reduces, the
        iteration's loss bookkeeping), `checkpointing.py` and `utils/common_utils.py` (loss reporting): as patch 2.
    T3. `initialize._warmup_jit_function` (from `set_jit_fusion_options`) runs the fused bias-GeLU/SwiGLU and
        dropout kernels on "cuda" tensors to warm their JIT: skipped (the CPU run uses no fused kernel).
    """
    if torch.cuda.is_available():
        return
    enable_cpu_mode()
    from megatron.training import initialize

    initialize.torch = _TorchWithCuda()  # T1
    initialize._warmup_jit_function = lambda **unused: None  # T3
    torch_on_host = _TorchBuildingOnHost()
    for module_name in _TRAINING_MODULES_WITH_CUDA_FACTORIES:  # T2
        importlib.import_module(module_name).torch = torch_on_host
