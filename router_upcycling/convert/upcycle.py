"""Upcycle a dense HF checkpoint into a megatron-core MoE checkpoint (torch_dist).

Experts are copies of the dense FFN (method.md part 1); routers are initialised as the router registry says:
from the attention heads for `mor` (part 2), at random for the baselines. Every expert's parameter points at
the same per-layer FFN tensor while the checkpoint is written, so N experts cost one copy of the FFN in memory.
"""
import dataclasses
import gc
import logging
import os
from typing import Dict, List, Optional

import torch

from router_upcycling.convert.hf_source import ConversionError, load_dense_tensors
from router_upcycling.convert.mapping import expand, map_dense_to_mcore
from router_upcycling.mcore.checkpoint import CHECKPOINT_VERSION, STORAGE_DTYPES
from router_upcycling.megatron_lm.flags import checkpoint_args
from router_upcycling.outputs import staged_output
from router_upcycling.settings.architecture import Architecture
from router_upcycling.settings.families import family_named
from router_upcycling.settings.moe import MoESettings
from router_upcycling.settings.routers import INIT_STD, resolve
from router_upcycling.settings.upcycle import CalibrationSettings, check_upcycle, qk_norm_side_for, router_init_for

log = logging.getLogger("router_upcycling.upcycle")


@dataclasses.dataclass
class UpcycleContext:
    """What a router initialiser (the registry's `initialise`) may read."""

    hf_model: str
    arch: Architecture
    moe: MoESettings
    calib: CalibrationSettings
    seed: int
    progress: bool


@dataclasses.dataclass
class RouterInit:
    """A router initialiser's result: per layer, router parameter name -> tensor (float32, on the CPU), and what the
    checkpoint metadata records of the calibration it used (None when it used none)."""

    weights: List[Dict[str, torch.Tensor]]
    calibration: Optional[dict] = None
    tied_experts: Optional[List[List[List[int]]]] = None  # per layer, the groups of experts that start with equal keys


def routers_from_attention(context: UpcycleContext) -> RouterInit:
    """Mixture-of-Routers weights from the frozen dense model (method.md part 2): per layer query_weight [R, d_r, d]
    and keys [K, d_r], and the calibration tokens used (calib.tokens, or fewer when the text ran out)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from router_upcycling.hf.loading import check_tokenizer_fits
    from router_upcycling.init.calibration import average_attention_keys
    from router_upcycling.init.grouping import break_ties, tied_experts
    from router_upcycling.init.routers import init_routers_from_attention, query_norm_gain
    from router_upcycling.text import TextDataError, read_documents

    calib, moe, arch = context.calib, context.moe, context.arch
    init = router_init_for(calib.router_init, arch)
    side = qk_norm_side_for(calib.qk_norm, arch) if arch.qk_norm else None
    after_norm = side in ("after", "inside")  # statistics of the norm's output
    tokenizer = AutoTokenizer.from_pretrained(context.hf_model)
    check_tokenizer_fits(tokenizer, arch.vocab_size, context.hf_model)  # the calibration text's ids, before the model
    seq_length = min(calib.seq_length, arch.max_position_embeddings)
    if seq_length < calib.seq_length:
        log.warning("calibration chunks of %d tokens, the model's max_position_embeddings (--calib-seq-length %d is "
                    "longer)", seq_length, calib.seq_length)
    model = AutoModelForCausalLM.from_pretrained(context.hf_model, dtype=torch.float32)
    try:
        avg_keys, tokens_used = average_attention_keys(
            model, tokenizer, read_documents(calib.files, calib.json_key), max_tokens=calib.tokens,
            seq_length=seq_length, batch_size=calib.batch_size, progress=context.progress,
            after_norm=after_norm, projection="q" if init == "query" else "k",
        )
    except TextDataError as err:
        raise ConversionError(str(err)) from None
    routers = init_routers_from_attention(model, avg_keys, moe.num_routers, moe.num_experts,
                                          fold_query_norm=side == "after")
    if init == "perturb":
        routers = [(query_weight, break_ties(keys, moe.num_experts, layer)) for layer, (query_weight, keys) in enumerate(routers)]
    weights = [{"query_weight": query_weight, "keys": keys} for query_weight, keys in routers]
    if moe.query_norm:  # the routers normalise their queries with the attention's own g_q
        for layer, router in zip(model.model.layers, weights):
            router["query_norm_weight"] = query_norm_gain(layer)
    del model
    gc.collect()
    record = {"tokens": tokens_used, "requested_tokens": calib.tokens, "seq_length": seq_length,
              "files": [os.path.abspath(f) for f in calib.files], "router_init": init}
    if arch.qk_norm:
        record["qk_norm"] = side
    return RouterInit(weights, record, [tied_experts(keys, moe.num_experts) for _, keys in routers])


def warn_tied_experts(per_layer: List[List[List[int]]]) -> None:
    """One warning line per layer where experts start with identical keys (identical logits for every token)."""
    for layer, groups in enumerate(per_layer):
        if groups:
            listed = "; ".join(", ".join(map(str, group)) for group in groups)
            log.warning("layer %d: experts %s hold identical keys: identical logits for every token (a group of top-k "
                        "trains as one expert; a larger one starts partly unused); grouped-query attention shares "
                        "average keys, see docs/method.md", layer, listed)


def random_router_weights(router, seed: int, layer: int, std: float = INIT_STD) -> dict:
    """Vanilla upcycling: the baseline routers start at random, normal(0, std), reproducibly per layer."""
    generator = torch.Generator().manual_seed(seed * 100003 + layer)
    return {name: torch.randn(p.shape, generator=generator) * std for name, p in router.named_parameters()}


def assign_weights(model, shared: dict, ffn: dict, routers: dict, expert_rules, dtype: torch.dtype) -> None:
    """Point every megatron parameter at its converted tensor; experts share their layer's FFN tensors."""
    params = dict(model.named_parameters())
    expected = set(params)
    assigned = set()
    for name, tensor in shared.items():
        params[name].data = tensor.to(dtype)
        assigned.add(name)
    num_experts = model.config.num_moe_experts
    for layer, tensors in ffn.items():
        for rule in expert_rules:
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
    from router_upcycling.checkpoint_folder import RELEASE, copy_tokenizer, iteration_dir_name, write_metadata, write_tracker
    from router_upcycling.mcore.checkpoint import model_state, save_sharded
    from router_upcycling.mcore.parallel import initialize_distributed
    from router_upcycling.mcore.model import build_gpt_model, transformer_config

    hf_config, arch = check_upcycle(hf_model, output, moe, calib, force)
    family = family_named(arch.family)
    names = family.dense_tensor_names(arch)
    load_dense_tensors(hf_model, names[:1])  # fail fast on unreadable weights, before calibration

    spec = moe.spec
    context = UpcycleContext(hf_model, arch, moe, calib, seed, progress)
    initialised = resolve(spec.initialise)(context) if spec.initialise else None
    if initialised and initialised.tied_experts:
        warn_tied_experts(initialised.tied_experts)

    with staged_output(output, force) as staging:
        log.info("reading %s", hf_model)
        hf_tensors = load_dense_tensors(hf_model, names)
        shared, ffn = map_dense_to_mcore(hf_tensors, arch)
        del hf_tensors
        initialize_distributed(seed=seed)
        config = transformer_config(arch, moe, params_dtype=STORAGE_DTYPES[dtype], perform_initialization=False)
        model = build_gpt_model(arch, moe, config)
        routers = {}
        for layer, block in enumerate(model.decoder.layers):
            weights = initialised.weights[layer] if initialised else random_router_weights(block.mlp.router, seed, layer)
            prefix = f"decoder.layers.{layer}.mlp.router."
            routers.update({prefix + name: tensor for name, tensor in weights.items()})
        assign_weights(model, shared, ffn, routers, family.expert_rules, STORAGE_DTYPES[dtype])
        del shared, ffn
        log.info("writing %s experts x %s layers to %s", moe.num_experts, arch.num_layers, output)
        # with Megatron-LM's common state: its `args` (the architecture, read by --use-checkpoint-args and its checks)
        state = {**model_state(model), "args": checkpoint_args(arch, moe), "checkpoint_version": CHECKPOINT_VERSION,
                 "iteration": 0}
        save_sharded(state, os.path.join(staging, iteration_dir_name(RELEASE)))
        write_metadata(staging, {
            "hf_config": hf_config,
            "moe": moe.to_dict(arch),
            "source_model": os.path.abspath(hf_model),
            "calibration": initialised.calibration if initialised else None,
            "tied_experts": ([sum(map(len, groups)) for groups in initialised.tied_experts]
                             if initialised and initialised.tied_experts is not None else None),
            "dtype": dtype,
            "seed": seed,
            "training": {"iteration": 0, "consumed_tokens": 0},
        })
        copy_tokenizer(hf_model, staging)
        write_tracker(staging, RELEASE)
    return os.path.abspath(output)
