"""Check that an upcycled MoE checkpoint computes what its dense source computes (method.md part 1)."""
import dataclasses
import logging
import os

import torch

from router_upcycling.checkpoint_folder import CheckpointError, read_checkpoint_settings
from router_upcycling.convert.hf_source import ConversionError
from router_upcycling.settings.architecture import read_dense_model


LONG_SEQUENCE = 2048  # verify's long sequence, or the model's maximum when that is shorter
# config.json entries that say how a folder was saved, not what the model computes
BOOKKEEPING_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "architectures")

log = logging.getLogger("router_upcycling.verify")


def differing_config_fields(recorded: dict, given: dict) -> list:
    """The config.json fields (bookkeeping left out) whose values differ between two configs, sorted."""
    keys = (set(recorded) | set(given)) - set(BOOKKEEPING_KEYS)
    return sorted(key for key in keys if recorded.get(key) != given.get(key))


def check_source(hf_model: str, checkpoint: str) -> None:
    """ConversionError when --hf-model is not the dense model --checkpoint was upcycled from, naming the config.json
    fields that differ from those its router_upcycling.json recorded and the recorded source; a warning when the
    architecture agrees but the folder or other fields do not (the logits then say whether the weights agree)."""
    given_config, given_arch = read_dense_model(hf_model)
    metadata, recorded_arch, _ = read_checkpoint_settings(checkpoint)
    source = metadata.get("source_model", "not recorded")
    fields = differing_config_fields(metadata["hf_config"], given_config)
    if given_arch != recorded_arch:
        arch_fields = [field.name for field in dataclasses.fields(given_arch)
                       if getattr(given_arch, field.name) != getattr(recorded_arch, field.name)]
        listed = ", ".join(f"{key} {metadata['hf_config'].get(key)!r} recorded vs {given_config.get(key)!r}"
                           for key in fields[:6]) or ", ".join(arch_fields)
        raise ConversionError(f"--hf-model {hf_model} is not the dense model --checkpoint {checkpoint} was upcycled "
                              f"from ({source}): {listed}")
    if fields:
        log.warning("--hf-model %s differs from the checkpoint's recorded source %s in config.json fields %s",
                    hf_model, source, ", ".join(fields))
    elif source != os.path.abspath(hf_model):
        log.warning("--hf-model %s is not the checkpoint's recorded source %s (same architecture); a logit difference "
                    "may mean other weights", hf_model, source)


@dataclasses.dataclass
class VerifyReport:
    """Over every compared token: the largest |logit difference| and the share of tokens whose top-1 token agrees;
    `batches` describes the sequences compared (e.g. ["4 x 32", "1 x 2048"])."""

    max_abs_diff: float
    top1_agreement: float
    num_tokens: int
    batches: list = dataclasses.field(default_factory=list)

    def passed(self, tolerance: float) -> bool:
        return self.max_abs_diff <= tolerance


def sample_token_sequences(vocab_size: int, num_sequences: int = 4, seq_length: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_sequences, seq_length), generator=generator)


def load_megatron_model(checkpoint_dir: str, iteration=None, dtype: torch.dtype = torch.float32,
                        use_transformer_engine: bool = False, moe_grouped_gemm: bool = False):
    """(model, metadata): the checkpoint's megatron GPTModel at TP = PP = EP = 1 on the CPU, weights loaded, eval
    mode; local layers unless `use_transformer_engine` (with `moe_grouped_gemm`, the training recipe's layers)."""
    from router_upcycling.mcore.checkpoint import load_model_weights
    from router_upcycling.mcore.model import build_gpt_model, transformer_config
    from router_upcycling.mcore.parallel import initialize_distributed

    from router_upcycling.mcore.checkpoint import readable_iteration_dir

    try:
        metadata, arch, moe = read_checkpoint_settings(checkpoint_dir)
        iteration_dir = readable_iteration_dir(checkpoint_dir, iteration)
    except CheckpointError as err:
        raise ConversionError(str(err)) from None
    initialize_distributed()
    config = transformer_config(arch, moe, params_dtype=dtype, perform_initialization=False, moe_grouped_gemm=moe_grouped_gemm)
    model = build_gpt_model(arch, moe, config, use_transformer_engine=use_transformer_engine)
    load_model_weights(model, iteration_dir)
    return model.eval(), metadata


@torch.no_grad()
def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, V] (float32, on the CPU) of a megatron GPTModel on any device, gathered over tensor-parallel ranks."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from router_upcycling.mcore.model import causal_attention_mask

    device = next(model.parameters()).device
    tokens = tokens.to(device)
    positions = torch.arange(tokens.shape[1], device=device)[None].expand_as(tokens)
    logits = model(tokens, positions, causal_attention_mask(tokens.shape[1], device=device))
    return gather_from_tensor_model_parallel_region(logits).float().cpu()


def verify(hf_model: str, checkpoint: str, num_sequences: int = 4, seq_length: int = 32,
           long_seq_length: int = LONG_SEQUENCE) -> VerifyReport:
    """Logits of the checkpoint's MoE against its dense source on random token sequences, both on this rank's device:
    `num_sequences` x `seq_length`, and one long sequence of `long_seq_length` tokens or the model's maximum, whichever
    is smaller (0: none). A short sequence misses what only far positions show (Llama 3's RoPE scaling)."""
    from transformers import AutoModelForCausalLM

    from router_upcycling.mcore.checkpoint import STORAGE_DTYPES
    from router_upcycling.mcore.parallel import current_device

    try:
        check_source(hf_model, checkpoint)
    except CheckpointError as err:
        raise ConversionError(str(err)) from None
    _, arch = read_dense_model(hf_model)
    model, metadata = load_megatron_model(checkpoint)
    device = current_device()
    # Round the dense weights as the checkpoint stored them, then compute both in float32: any
    # difference left is the conversion's, not the storage dtype's.
    stored_dtype = STORAGE_DTYPES[metadata.get("dtype", "fp32")]
    dense = AutoModelForCausalLM.from_pretrained(hf_model, dtype=stored_dtype).float().eval().to(device)
    model = model.to(device)
    batches = [sample_token_sequences(arch.vocab_size, num_sequences, seq_length)]
    long_length = min(long_seq_length, arch.max_position_embeddings)
    if long_length > 0:
        batches.append(sample_token_sequences(arch.vocab_size, 1, long_length, seed=1))
    max_abs_diff, agreeing, num_tokens = 0.0, 0.0, 0
    for tokens in batches:
        with torch.no_grad():
            expected = dense(tokens.to(device)).logits.float().cpu()
        actual = megatron_logits(model, tokens)
        max_abs_diff = max(max_abs_diff, (actual - expected).abs().max().item())
        agreeing += (actual.argmax(-1) == expected.argmax(-1)).float().sum().item()
        num_tokens += tokens.numel()
    return VerifyReport(max_abs_diff, agreeing / num_tokens, num_tokens,
                        [f"{tokens.shape[0]} x {tokens.shape[1]}" for tokens in batches])
