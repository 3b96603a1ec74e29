"""Parity: this device against a CPU float32 reference, on a tiny upcycled model (seconds on any device).

The model: a random dense Qwen2 (d 64, 2 layers, 8 heads, 4 key/value heads, FFN 96), upcycled by `upcycle`
to 8 experts top-2 with 8 Mixture-of-Routers routers (`sum`), weights stored in float32.

| check | on this device | CPU float32 reference |
|---|---|---|
| router | layer 0's MixtureOfRoutersRouter: logits (and, in fp32, the top-2 probabilities) | router_upcycling.mor |
| model | the upcycled megatron model, local layers | the dense Hugging Face model (the upcycled model computes its function, method.md part 1) |
| verify | convert.verify.verify: dense and upcycled model both on this device | (verify's own) |
| TE | the recipe's layers (Transformer Engine, grouped GEMM off and on) on the same checkpoint, bf16 | the dense model |

Tolerance = relative tolerance x the largest |reference value|:
- float32: 1e-4. Float32 rounds at 6e-8 relative; another device sums in another order, which moves results by
  a few units of rounding per reduction. 1e-4 leaves over 100x room above what that gives at this size and still
  sits far below what a real defect gives (a wrong weight, mask, position or routing decision moves logits by a
  tenth of their size or more).
- bf16: 2 x r x 2^-8. bfloat16 keeps 8 significant bits, so each rounding moves a value by up to 2^-8 of its size.
  Along the model the residual stream is rounded after the embedding, after every attention and every MoE block,
  and at the final norm and output layer: r = 2L + 2 roundings for L layers (6 here), whose errors add at worst
  linearly; the factor 2 covers the roundings inside each block. The router rounds its input, its queries and its
  keys: r = 3. Measured on a CPU: 1.5% of the largest logit for the model (allowed 4.7%), 0.3% for the router's
  logits (allowed 2.3%).
- float32 where matrix products run in TF32 (parallel.float32_matmuls_use_tf32): 2 x r x 2^-11, the same count
  with TF32's 11 significant bits.
"""
import dataclasses
import json
import os
from typing import Callable, List, Optional

import torch

from router_upcycling.convert.verify import load_megatron_model, megatron_logits, sample_token_sequences, verify
from router_upcycling.mcore.parallel import current_device, float32_matmuls_use_tf32, transformer_engine_available
from router_upcycling.settings.architecture import read_dense_model

FP32_RELATIVE_TOLERANCE = 1e-4
ROUNDING = {"bf16": 2.0 ** -8, "tf32": 2.0 ** -11}  # largest relative change of one rounding to nearest
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NUM_LAYERS = 2
ROUTER_TOKENS = 256


def relative_tolerance(dtype: str, roundings: int) -> float:
    """Allowed |difference| / largest |reference value| (module docstring)."""
    if dtype == "fp32" and not float32_matmuls_use_tf32():
        return FP32_RELATIVE_TOLERANCE
    return 2 * roundings * ROUNDING["tf32" if dtype == "fp32" else dtype]


@dataclasses.dataclass
class Check:
    name: str
    dtype: str
    max_abs_diff: Optional[float] = None
    tolerance: Optional[float] = None
    skipped: str = ""  # why it cannot run here
    error: str = ""  # what stopped its device side: a failure

    @property
    def result(self) -> str:
        if self.error:
            return "FAIL"
        if self.skipped:
            return "skipped"
        return "OK" if self.max_abs_diff <= self.tolerance else "FAIL"

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
                "result": self.result, "note": self.error or self.skipped}

    def line(self) -> str:
        if self.error or self.skipped:
            return f"{self.name} {self.dtype}: {self.result} ({self.error or self.skipped})"
        return f"{self.name} {self.dtype}: max |diff| {self.max_abs_diff:.3e}, tolerance {self.tolerance:.3e}: {self.result}"


def compare(name: str, dtype: str, actual: torch.Tensor, reference: torch.Tensor, roundings: int) -> Check:
    scale = reference.abs().max().item()
    return Check(name, dtype, (actual.float() - reference).abs().max().item(), relative_tolerance(dtype, roundings) * scale)


def could_not_run(name: str, dtype: str, error: Exception) -> Check:
    message = str(error).strip().splitlines()
    return Check(name, dtype, error=f"{type(error).__name__}: {message[0] if message else ''}"[:300])


def prepare_tiny_model(workdir: str) -> tuple:
    """(dense HF folder, upcycled checkpoint folder) of the parity model, written under workdir."""
    from router_upcycling.convert.upcycle import CalibrationSettings, upcycle
    from router_upcycling.settings.moe import MoESettings
    from router_upcycling.settings.routers import DEFAULT_ROUTER
    from router_upcycling.testing import SAMPLE_TEXT, make_dense_qwen2

    dense = make_dense_qwen2(os.path.join(workdir, "dense"), num_heads=8, num_kv_heads=4, num_layers=NUM_LAYERS, seed=3)
    calibration = os.path.join(workdir, "calibration.jsonl")
    with open(calibration, "w") as f:
        f.writelines(json.dumps({"text": text}) + "\n" for text in SAMPLE_TEXT)
    moe = MoESettings(num_experts=8, topk=2, router=DEFAULT_ROUTER, num_routers=8, aggregation="sum")
    checkpoint = upcycle(dense, os.path.join(workdir, "moe"), moe, CalibrationSettings(files=[calibration], tokens=96,
                         seq_length=32), dtype="fp32", progress=False)
    return dense, checkpoint


@torch.no_grad()
def dense_reference_logits(dense_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    return model(tokens).logits.float()


@torch.no_grad()
def router_reference(checkpoint: str):
    """(x [T, d], logits [T, N], top-k probabilities [T, N]): layer 0's router with its weights as stored (float32)
    on a random input, computed on the CPU by the router math."""
    from router_upcycling.mor import mor_expert_logits

    model, _ = load_megatron_model(checkpoint)
    router = model.decoder.layers[0].mlp.router
    x = torch.randn(ROUTER_TOKENS, router.config.hidden_size, generator=torch.Generator().manual_seed(0))
    logits = mor_expert_logits(x, router.query_weight, router.keys, router.config.num_moe_experts, router.aggregation,
                               router.router_scale)
    top_logits, top_experts = logits.topk(router.topk, dim=-1)
    return x, logits, torch.zeros_like(logits).scatter(-1, top_experts, top_logits.softmax(-1))


def device_model(checkpoint: str, dtype: str, use_transformer_engine: bool = False, moe_grouped_gemm: bool = False):
    """The upcycled checkpoint's megatron model on this device in `dtype`: the side every check puts to the test."""
    model, _ = load_megatron_model(checkpoint, dtype=DTYPES[dtype], use_transformer_engine=use_transformer_engine,
                                   moe_grouped_gemm=moe_grouped_gemm)
    return model.to(current_device())


@torch.no_grad()
def router_checks(router, dtype: str, reference) -> List[Check]:
    """Layer 0's router on the device against the CPU reference on the same input x [T, d]."""
    x, logits_ref, probs_ref = reference
    x_device = x.to(current_device(), DTYPES[dtype])
    checks = [compare("router logits", dtype, router.gating(x_device).cpu(), logits_ref, roundings=3)]
    if dtype == "fp32":  # in bf16 a near-tie may legitimately pick another expert
        probs, _ = router(x_device.unsqueeze(1))  # megatron's routing takes [s, b, d]
        checks.append(compare("router top-2 probabilities", dtype, probs.cpu(), probs_ref, roundings=3))
    return checks


def run_parity(workdir: str, report: Callable[[str], None]) -> List[Check]:
    """Every check of the module docstring, in order; `report` gets one line per check."""
    def record(check: Check) -> Check:
        report(check.line())
        return check

    dense, checkpoint = prepare_tiny_model(workdir)
    tokens = sample_token_sequences(read_dense_model(dense)[1].vocab_size, num_sequences=4, seq_length=32)
    logits_ref = dense_reference_logits(dense, tokens)
    model_roundings = 2 * NUM_LAYERS + 2
    router_ref = router_reference(checkpoint)
    checks = []
    for dtype in DTYPES:
        model = device_model(checkpoint, dtype)
        checks += [record(check) for check in router_checks(model.decoder.layers[0].mlp.router, dtype, router_ref)]
        checks.append(record(compare("model logits", dtype, megatron_logits(model, tokens), logits_ref, model_roundings)))
        del model
    verified = verify(dense, checkpoint)  # its own reference: the dense model on this device
    tolerance = relative_tolerance("fp32", model_roundings) * logits_ref.abs().max().item()
    checks.append(record(Check("verify", "fp32", verified.max_abs_diff, tolerance)))
    checks += [record(check) for check in transformer_engine_checks(checkpoint, tokens, logits_ref, model_roundings)]
    return checks


def transformer_engine_checks(checkpoint: str, tokens, logits_ref, roundings: int) -> List[Check]:
    """The recipe's layers on the upcycled checkpoint: loading it is part of the check (training loads it so)."""
    names = {False: "TE layers", True: "TE layers + grouped GEMM"}
    if not transformer_engine_available():
        return [Check(name, "bf16", skipped="Transformer Engine does not import here") for name in names.values()]
    checks = []
    for grouped_gemm, name in names.items():
        try:
            model = device_model(checkpoint, "bf16", use_transformer_engine=True, moe_grouped_gemm=grouped_gemm)
            logits = megatron_logits(model, tokens)
        except Exception as error:  # reported in the table: the other checks and stages still run
            checks.append(could_not_run(name, "bf16", error))
            continue
        checks.append(compare(name, "bf16", logits, logits_ref, roundings))
        del model
    return checks
