"""dense -> upcycle -> (perturb) -> export: Megatron, `mor` and stock `qwen2_moe` logits agree (float32)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2MoeForCausalLM

from router_upcycling.convert.export import export
from router_upcycling.convert.hf_export import ExportError
from router_upcycling.convert.upcycle import CalibrationSettings, upcycle
from router_upcycling.convert.verify import load_megatron_model, megatron_logits, sample_token_sequences
from router_upcycling.checkpoint_folder import RELEASE, iteration_dir_name, write_metadata, write_tracker
from router_upcycling.mcore.checkpoint import model_state, save_sharded
from router_upcycling.settings.moe import MoESettings
from router_upcycling.testing import SAMPLE_TEXT, make_dense_qwen2

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    (root / "calib.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXT))
    make_dense_qwen2(str(root / "dense"), num_heads=8, num_kv_heads=2, tied=False, seed=11)
    return root


def upcycled(root, name, moe):
    path = root / name
    if not path.exists():
        calib = CalibrationSettings(files=[str(root / "calib.jsonl")], tokens=256, seq_length=32)
        upcycle(str(root / "dense"), str(path), moe, calib, dtype="fp32", progress=False)
    return str(path)


def perturbed_copy(checkpoint, output, seed=0):
    """A checkpoint whose experts and routers differ: what training would produce."""
    model, metadata = load_megatron_model(checkpoint)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".experts." in name or ".router." in name:
                param.add_(torch.randn(param.shape, generator=generator) * param.abs().mean())
    os.makedirs(output)
    save_sharded(model_state(model), os.path.join(output, iteration_dir_name(RELEASE)))
    write_metadata(output, {k: v for k, v in metadata.items() if k != "format_version"})
    shutil.copytree(os.path.join(checkpoint, "tokenizer"), os.path.join(output, "tokenizer"))
    write_tracker(output, RELEASE)
    return output, model


def hf_logits(folder, tokens, remote_code):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=remote_code)
    with torch.no_grad():
        return model(tokens).logits, model


TOKENS = sample_token_sequences(vocab_size=300, num_sequences=3, seq_length=20, seed=4)

FOLDABLE = [
    MoESettings(router="mor", num_experts=4, topk=2, num_routers=4),
    MoESettings(router="mor", num_experts=8, topk=2, num_routers=2),
    MoESettings(router="linear", num_experts=4, topk=2),
    MoESettings(router="switch", num_experts=4),
]
NOT_FOLDABLE = [
    MoESettings(router="mor", num_experts=4, topk=2, num_routers=8),
    MoESettings(router="mor", num_experts=4, topk=2, num_routers=4, aggregation="max"),
    MoESettings(router="mlp", num_experts=4, topk=2),
    MoESettings(router="locmoe", num_experts=4, topk=2),
]


def case_id(moe):
    return f"{moe.router}-R{moe.num_routers}-N{moe.num_experts}-{moe.aggregation}"


def test_locmoe_is_exported_without_router_tensors_and_refused_as_qwen2_moe(root, tmp_path):
    """The GrAP gate has no weights: the `mor` folder computes it from the copied router math."""
    from safetensors import safe_open

    checkpoint = upcycled(root, case_id(NOT_FOLDABLE[3]), NOT_FOLDABLE[3])
    folder = export(checkpoint, str(tmp_path / "mor"), "mor", dtype="fp32")
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as weights:
        assert not [name for name in weights.keys() if ".mlp.gate." in name]
    assert json.loads(open(os.path.join(folder, "config.json")).read())["router_type"] == "locmoe"
    assert "def grap_expert_logits" in open(os.path.join(folder, "mor.py")).read()
    result = run_export("--checkpoint", checkpoint, "--output", tmp_path / "stock", "--format", "qwen2_moe")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "'locmoe' router" in result.stderr and "ReLU is not linear" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "stock").exists()


@pytest.mark.parametrize("moe", FOLDABLE + NOT_FOLDABLE, ids=case_id)
def test_exports_of_an_upcycled_model_compute_the_dense_logits(root, tmp_path, moe):
    checkpoint = upcycled(root, case_id(moe), moe)
    dense = AutoModelForCausalLM.from_pretrained(str(root / "dense"), dtype=torch.float32)
    with torch.no_grad():
        expected = dense(TOKENS).logits
    formats = ["mor", "qwen2_moe"] if moe in FOLDABLE else ["mor"]
    for fmt in formats:
        folder = export(checkpoint, str(tmp_path / fmt), fmt, dtype="fp32")
        logits, _ = hf_logits(folder, TOKENS, remote_code=fmt == "mor")
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("moe", FOLDABLE + NOT_FOLDABLE, ids=case_id)
def test_trained_experts_and_routers_survive_export(root, tmp_path, moe):
    checkpoint, megatron_model = perturbed_copy(upcycled(root, case_id(moe), moe), str(tmp_path / "trained"))
    expected = megatron_logits(megatron_model.eval(), TOKENS)
    mor_folder = export(checkpoint, str(tmp_path / "mor"), "mor", dtype="fp32")
    mor_logits, _ = hf_logits(mor_folder, TOKENS, remote_code=True)
    torch.testing.assert_close(mor_logits, expected, atol=1e-4, rtol=0)
    assert (mor_logits - hf_logits(str(root / "dense"), TOKENS, False)[0]).abs().max() > 1e-2  # perturbation is real
    if moe in FOLDABLE:
        stock_folder = export(checkpoint, str(tmp_path / "stock"), "qwen2_moe", dtype="fp32")
        stock_logits, stock = hf_logits(stock_folder, TOKENS, remote_code=False)
        assert isinstance(stock, Qwen2MoeForCausalLM)
        torch.testing.assert_close(stock_logits, expected, atol=1e-4, rtol=0)


def test_bf16_export_keeps_expert_choice(root, tmp_path):
    moe = FOLDABLE[0]
    checkpoint, _ = perturbed_copy(upcycled(root, case_id(moe), moe), str(tmp_path / "trained"), seed=3)
    choices = {}
    for dtype in ("fp32", "bf16"):
        model = AutoModelForCausalLM.from_pretrained(export(checkpoint, str(tmp_path / dtype), "mor", dtype=dtype),
                                                     trust_remote_code=True).float()
        picked = []
        hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, out: picked.append(out[2].sort(-1).values))
                 for layer in model.model.layers]
        with torch.no_grad():
            model(TOKENS)
        for h in hooks:
            h.remove()
        choices[dtype] = torch.cat(picked)
    agreement = (choices["fp32"] == choices["bf16"]).all(-1).float().mean().item()
    assert agreement >= 0.99


def test_tokenizer_and_model_card_travel(root, tmp_path):
    checkpoint = upcycled(root, case_id(FOLDABLE[0]), FOLDABLE[0])
    folder = export(checkpoint, str(tmp_path / "mor"), "mor")
    text = "def add(a, b):\n    return a + b"
    original, exported = AutoTokenizer.from_pretrained(str(root / "dense")), AutoTokenizer.from_pretrained(folder)
    assert exported(text).input_ids == original(text).input_ids and exported.decode(exported(text).input_ids) == text
    card = open(os.path.join(folder, "README.md")).read()
    used = json.loads(open(os.path.join(checkpoint, "router_upcycling.json")).read())["calibration"]["tokens"]
    assert str(root / "dense") in card and f"| calibration tokens | {used} (256 asked for: the calibration text ran out) |" in card


def run_export(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), "export", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_export_bad_input(root, tmp_path):
    foldable = upcycled(root, case_id(FOLDABLE[0]), FOLDABLE[0])
    not_foldable = upcycled(root, case_id(NOT_FOLDABLE[0]), NOT_FOLDABLE[0])
    incomplete = tmp_path / "incomplete"
    shutil.copytree(foldable, incomplete)
    os.remove(incomplete / "latest_checkpointed_iteration.txt")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    cases = [
        (("--checkpoint", tmp_path / "missing", "--output", tmp_path / "o", "--format", "mor"), "not found"),
        ((("--checkpoint", incomplete, "--output", tmp_path / "o", "--format", "mor")), "no complete checkpoint"),
        (("--checkpoint", foldable, "--output", tmp_path / "o", "--format", "mor", "--iteration", 7), "missing or incomplete"),
        (("--checkpoint", not_foldable, "--output", tmp_path / "o", "--format", "qwen2_moe"), "keys each"),
        (("--checkpoint", foldable, "--output", existing, "--format", "mor"), "--force"),
        (("--checkpoint", foldable, "--output", tmp_path / "o", "--format", "gguf"), "invalid choice"),
    ]
    for args, fragment in cases:
        result = run_export(*args)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert fragment in result.stderr.strip().splitlines()[-1], result.stderr
    assert sorted(os.listdir(tmp_path)) == ["existing", "incomplete"] and os.listdir(existing) == ["keep.txt"]
    with pytest.raises(ExportError, match="mlp router"):
        export(upcycled(root, case_id(NOT_FOLDABLE[2]), NOT_FOLDABLE[2]), str(tmp_path / "o"), "qwen2_moe")
