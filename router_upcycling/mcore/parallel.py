"""Process groups and the device for megatron-core: torchrun/srun environment or a lone process.

The one place that knows which device a run is on: CUDA (NCCL) when present, else the CPU (gloo,
with router_upcycling.mcore.cpu's patches). Everything else asks here.
"""
import os
import platform
import socket
from typing import Dict, List

import psutil
import torch
import torch.distributed as dist

from router_upcycling.errors import UserError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def unsupported_here(settings: Dict) -> List[str]:
    """Why each of these settings (flag destination -> value) cannot run on this machine; empty when all can."""
    if torch.cuda.is_available():
        return []
    from router_upcycling.mcore.cpu import unsupported_on_cpu

    return unsupported_on_cpu(settings)


def device_type() -> str:
    """"cuda" or "cpu": the kind of device current_device() will answer, asked without creating a CUDA context
    (safe before a rank has picked its GPU)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def current_device() -> torch.device:
    """This rank's device: its GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


H100_BF16_PEAK_FLOPS = 989e12


def default_peak_flops():
    """Peak FLOP/s per device for MFU when --peak-flops is not given: H100 dense bf16 on CUDA, none on CPU."""
    return H100_BF16_PEAK_FLOPS if torch.cuda.is_available() else None


def memory_figures() -> Dict[str, float]:
    """Resident host memory of this process and, on CUDA, the peak of allocated device memory (MiB)."""
    figures = {"host_memory_mb": psutil.Process().memory_info().rss / 2**20}
    if torch.cuda.is_available():
        figures["gpu_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return figures


def reset_peak_memory() -> None:
    """Start a new peak for memory_figures()'s gpu_max_allocated_mb (the host figure is resident memory, not a peak)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def float32_matmuls_use_tf32() -> bool:
    """Whether float32 matrix products here round their inputs to TF32 (11 significant bits): torch's switch, or
    TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 (set in some NVIDIA containers), which forces it whatever the switch says."""
    if not torch.cuda.is_available():
        return False
    return torch.backends.cuda.matmul.allow_tf32 or os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE") == "1"


def device_description() -> Dict[str, object]:
    """What this process computes on, for reports: device type, name, how many this node has, and its runtime."""
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(torch.cuda.current_device())
        return {"type": "cuda", "name": properties.name, "count": torch.cuda.device_count(),
                "memory_gb": round(properties.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(), "tf32_matmuls": float32_matmuls_use_tf32()}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "count": 1,
            "threads": torch.get_num_threads()}


# what torchrun tells each process about its job; a child started without them is a world of one
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                       "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


def single_process_env() -> Dict[str, str]:
    """This process's environment without the launcher's rank variables, for a child that runs alone."""
    return {key: value for key, value in os.environ.items()
            if key not in _LAUNCHER_VARIABLES and not key.startswith("TORCHELASTIC_")}


def check_layout(world_size: int, tensor_model_parallel_size: int, pipeline_model_parallel_size: int,
                 expert_model_parallel_size: int) -> None:
    """The parallel sizes must tile the world (megatron-core's rules, as one-line errors)."""
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size
    if world_size % model_parallel:
        raise UserError(f"{world_size} ranks cannot hold tensor x pipeline parallel size {tensor_model_parallel_size} x "
                        f"{pipeline_model_parallel_size}: the world size must be a multiple of {model_parallel}")
    data_parallel = world_size // model_parallel
    if (data_parallel * tensor_model_parallel_size) % expert_model_parallel_size:
        raise UserError(f"--expert-model-parallel-size {expert_model_parallel_size} must divide data-parallel x "
                        f"tensor-parallel size ({data_parallel} x {tensor_model_parallel_size})")


def initialize_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    seed: int = 0,
) -> None:
    """Join the job started by torchrun (RANK, WORLD_SIZE, MASTER_ADDR/PORT), or start a world of one.

    CPU runs use gloo and megatron-core's CPU patches (router_upcycling.mcore.cpu); GPU runs NCCL.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from router_upcycling.mcore.cpu import enable_cpu_mode

    check_layout(int(os.environ.get("WORLD_SIZE", 1)), tensor_model_parallel_size, pipeline_model_parallel_size,
                 expert_model_parallel_size)
    enable_cpu_mode()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size, pipeline_model_parallel_size, expert_model_parallel_size=expert_model_parallel_size
        )
    model_parallel_cuda_manual_seed(seed)


def shutdown_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
