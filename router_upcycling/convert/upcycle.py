"""Upcycle a dense HF Qwen2 checkpoint into a megatron-core MoE checkpoint (torch_dist).

Experts are copies of the dense FFN (method.md part 1); routers are initialised from the
attention heads for `mor` (part 2) or at random for the baselines. Every expert's parameter
points at the same per-layer FFN tensor while the checkpoint is written, so N experts cost one
copy of the FFN in memory.
"""
import dataclasses
import gc
import logging
import os
from typing import List, Optional

import torch

from router_upcycling.convert.hf_source import ConversionError, load_dense_tensors, read_hf_config
from router_upcycling.convert.mapping import EXPERT_RULES, dense_tensor_names, expand, map_dense_to_mcore
from router_upcycling.mcore.checkpoint import STORAGE_DTYPES
from router_upcycling.mcore.model import MoESettings, head_dim
from router_upcycling.mor import check_grap_split
from router_upcycling.outputs import refuse_existing, staged_output

log = logging.getLogger("router_upcycling.upcycle")


@dataclasses.dataclass
class CalibrationSettings:
    files: List[str] = dataclasses.field(default_factory=list)
    json_key: str = "text"
    tokens: int = 41943040  # paper: 10 iterations x batch 1024 x sequence 4096
    seq_length: int = 4096
    batch_size: Optional[int] = None


def check_router_settings(hf_config: dict, moe: MoESettings) -> None:
    """Refuse router settings the initialisation or the router's math cannot follow, naming the counts that work."""
    if moe.router == "locmoe":
        try:
            check_grap_split(hf_config["hidden_size"], moe.num_experts)
        except ValueError as err:
            raise ConversionError(f"--num-experts {moe.num_experts}: {err}") from None
    if moe.router != "mor":
        return
    from router_upcycling.init.grouping import RouterCountError, check_router_count

    try:
        check_router_count(hf_config["num_attention_heads"], head_dim(hf_config), moe.num_routers, moe.num_experts)
    except RouterCountError as err:
        raise ConversionError(str(err)) from None


def mor_router_weights(model_dir: str, hf_config: dict, moe: MoESettings, calib: CalibrationSettings, progress: bool):
    """Per layer (query_weight [R, d_r, d], keys [K, d_r]) from the frozen dense model (method.md part 2), and the
    number of calibration tokens used (calib.tokens, or fewer when the calibration text ran out)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from router_upcycling.init.calibration import average_attention_keys
    from router_upcycling.init.routers import init_routers_from_attention
    from router_upcycling.text import TextDataError, read_documents

    if not calib.files:
        raise ConversionError("--router mor needs calibration text: pass --calib-data FILE (jsonl, txt or a dataset folder)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    try:
        avg_keys, tokens_used = average_attention_keys(
            model, tokenizer, read_documents(calib.files, calib.json_key), max_tokens=calib.tokens,
            seq_length=calib.seq_length, batch_size=calib.batch_size, progress=progress,
        )
    except TextDataError as err:
        raise ConversionError(str(err)) from None
    routers = init_routers_from_attention(model, avg_keys, moe.num_routers, moe.num_experts)
    del model
    gc.collect()
    return routers, tokens_used


def random_router_weights(router, seed: int, layer: int, std: float = 0.02) -> dict:
    """Vanilla upcycling: the baseline routers start at random, normal(0, std), reproducibly per layer."""
    generator = torch.Generator().manual_seed(seed * 100003 + layer)
    return {name: torch.randn(p.shape, generator=generator) * std for name, p in router.named_parameters()}


def assign_weights(model, shared: dict, ffn: dict, routers: dict, dtype: torch.dtype) -> None:
    """Point every megatron parameter at its converted tensor; experts share their layer's FFN tensors."""
    params = dict(model.named_parameters())
    expected = set(params)
    assigned = set()
    for name, tensor in shared.items():
        params[name].data = tensor.to(dtype)
        assigned.add(name)
    num_experts = model.config.num_moe_experts
    for layer, tensors in ffn.items():
        for rule in EXPERT_RULES:
            tensor = tensors[rule.mcore].to(dtype)
            for expert in range(num_experts):
                name = expand(rule.mcore, layer, expert)
                params[name].data = tensor
                assigned.add(name)
    for name, tensor in routers.items():
        params[name].data = tensor.to(torch.float32)
        assigned.add(name)
    if assigned != expected:
        raise RuntimeError(f"weight table mismatch: unassigned {sorted(expected - assigned)[:3]}, unknown {sorted(assigned - expected)[:3]}")


def upcycle(
    hf_model: str,
    output: str,
    moe: MoESettings,
    calib: CalibrationSettings,
    dtype: str = "bf16",
    seed: int = 1234,
    force: bool = False,
    progress: bool = True,
) -> str:
    """Write the MoE checkpoint folder `output` (docs/checkpoint-format.md) and return its path."""
    from router_upcycling.mcore.checkpoint import (
        RELEASE, copy_tokenizer, iteration_dir_name, model_state, save_sharded,
        write_metadata, write_tracker,
    )
    from router_upcycling.mcore.parallel import initialize_distributed
    from router_upcycling.mcore.model import build_gpt_model, transformer_config

    hf_config = read_hf_config(hf_model)
    check_router_settings(hf_config, moe)
    num_layers = hf_config["num_hidden_layers"]
    tied = bool(hf_config.get("tie_word_embeddings", False))
    refuse_existing(output, force)
    names = dense_tensor_names(num_layers, tied)
    load_dense_tensors(hf_model, names[:1])  # fail fast on unreadable weights, before calibration

    mor_routers, calibration_tokens = (
        mor_router_weights(hf_model, hf_config, moe, calib, progress) if moe.router == "mor" else (None, None)
    )

    with staged_output(output, force) as staging:
        log.info("reading %s", hf_model)
        hf_tensors = load_dense_tensors(hf_model, names)
        shared, ffn = map_dense_to_mcore(
            hf_tensors, num_layers, hf_config["num_attention_heads"],
            hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"], tied,
        )
        del hf_tensors
        initialize_distributed(seed=seed)
        config = transformer_config(hf_config, moe, params_dtype=STORAGE_DTYPES[dtype], perform_initialization=False)
        model = build_gpt_model(hf_config, moe, config)
        routers = {}
        for layer, block in enumerate(model.decoder.layers):
            prefix = f"decoder.layers.{layer}.mlp.router."
            if mor_routers is not None:
                query_weight, keys = mor_routers[layer]
                routers.update({prefix + "query_weight": query_weight, prefix + "keys": keys})
            else:
                weights = random_router_weights(block.mlp.router, seed, layer)
                routers.update({prefix + name: t for name, t in weights.items()})
        assign_weights(model, shared, ffn, routers, STORAGE_DTYPES[dtype])
        del shared, ffn
        log.info("writing %s experts x %s layers to %s", moe.num_experts, num_layers, output)
        save_sharded(model_state(model), os.path.join(staging, iteration_dir_name(RELEASE)))
        write_metadata(staging, {
            "hf_config": hf_config,
            "moe": moe.to_dict(hf_config),
            "source_model": os.path.abspath(hf_model),
            "calibration": (
                {"tokens": calibration_tokens, "requested_tokens": calib.tokens, "seq_length": calib.seq_length,
                 "files": [os.path.abspath(f) for f in calib.files]}
                if moe.router == "mor" else None
            ),
            "dtype": dtype,
            "seed": seed,
            "training": {"iteration": 0, "consumed_tokens": 0},
        })
        copy_tokenizer(hf_model, staging)
        write_tracker(staging, RELEASE)
    return os.path.abspath(output)
