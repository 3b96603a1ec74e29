"""Router Upcycling on Megatron: dense Qwen -> Mixture-of-Experts, train, export, evaluate."""
import logging

# torch's CUDA builds log "No CUDA runtime is found, using CUDA_HOME=..." when torch.utils.cpp_extension is
# imported (megatron-core 0.19 imports it) on a machine without a GPU: noise on every command's stderr.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
