"""The router registry: one table that the commands, the metadata, the megatron-core layer spec, the HF config and
the export read; a throw-away router added through the registry alone upcycles, verifies and exports."""
import json
import os

import pytest
import torch

from hf_test_support import logits_in_fresh_interpreter
from router_upcycling.commands.convert import build_parser as convert_parser
from router_upcycling.errors import SettingError
from router_upcycling.hf.modeling_mor import GATES
from router_upcycling.settings import routers
from router_upcycling.settings.moe import MoESettings
from router_upcycling.testing import make_dense_qwen2
from router_upcycling.train.config import build_parser as train_parser


def choices(parser, dest, command=None):
    if command:
        parser = parser._subparsers._group_actions[0].choices[command]
    return next(action.choices for action in parser._actions if action.dest == dest)


def test_every_router_has_an_hf_gate_and_every_command_offers_every_router():
    assert {spec.hf_gate for spec in map(routers.get_router, routers.router_names())} <= set(GATES)
    assert list(choices(convert_parser(), "router", "upcycle")) == routers.router_names()
    assert list(choices(train_parser(), "moe_router_type")) == routers.router_names()
    assert list(choices(convert_parser(), "router_aggregation", "upcycle")) == list(routers.AGGREGATIONS)


def test_settings_errors_name_the_flag_of_the_command_that_reports_them():
    with pytest.raises(SettingError) as raised:
        MoESettings(num_experts=4, topk=5)
    assert str(raised.value.as_flag({"topk": "--moe-router-topk"})).startswith("--moe-router-topk must be between 1 and")
    assert str(raised.value.as_flag({"topk": "--topk"})).startswith("--topk must be between 1 and")
    with pytest.raises(SettingError, match="'gru' is not a router; choose one of mor, linear"):
        MoESettings(router="gru")


def test_top1_and_mixture_facts_come_from_the_registry():
    assert MoESettings(router="switch", topk=2).topk == 1
    assert MoESettings(router="mor", num_experts=8).num_routers == 8 and MoESettings(router="linear").num_routers is None
    assert MoESettings(router="mor", num_experts=8, num_routers=32).num_keys == 32


def orthogonal_gates(context):
    """A throw-away initialisation: each layer's linear gate has orthonormal rows scaled to std 0.02 per entry."""
    from router_upcycling.convert.upcycle import RouterInit

    hidden, experts = context.arch.hidden_size, context.moe.num_experts
    generator = torch.Generator().manual_seed(context.seed)
    weights = []
    for _ in range(context.arch.num_layers):
        rows, _ = torch.linalg.qr(torch.randn(hidden, experts, generator=generator))  # [d, N], orthonormal columns
        weights.append({"weight": 0.02 * hidden ** 0.5 * rows.t().contiguous()})
    return RouterInit(weights)


@pytest.fixture
def orthogonal_router():
    spec = routers.register(routers.RouterSpec(
        name="orthogonal", summary="linear gate with orthogonal rows (a test's throw-away router)",
        mcore_class=routers.LINEAR.mcore_class, hf_gate=routers.LINEAR.hf_gate, initialise=orthogonal_gates,
        linear_gate=routers.LINEAR.linear_gate,
    ))
    yield spec
    routers.unregister(spec.name)


def test_a_router_added_through_the_registry_alone_upcycles_verifies_and_exports(orthogonal_router, tmp_path):
    from router_upcycling.convert.export import export
    from router_upcycling.convert.upcycle import CalibrationSettings, upcycle
    from router_upcycling.convert.verify import verify

    dense = make_dense_qwen2(str(tmp_path / "dense"), num_heads=8, num_kv_heads=2, seed=11)
    moe = MoESettings(router="orthogonal", num_experts=4, topk=2)
    checkpoint = upcycle(dense, str(tmp_path / "moe"), moe, CalibrationSettings(), dtype="fp32", seed=5, progress=False)
    report = verify(dense, checkpoint)
    assert report.max_abs_diff <= 1e-4 and report.top1_agreement == 1.0
    assert json.loads(open(os.path.join(checkpoint, "router_upcycling.json")).read())["moe"]["router"] == "orthogonal"

    folders = [export(checkpoint, str(tmp_path / fmt), fmt, dtype="fp32") for fmt in ("mor", "qwen2_moe")]
    assert "| router | orthogonal |" in open(os.path.join(folders[0], "README.md")).read()
    from safetensors.torch import load_file

    gate = load_file(os.path.join(folders[1], "model.safetensors"))["model.layers.0.mlp.gate.weight"]
    torch.testing.assert_close(gate @ gate.t(), 0.02 ** 2 * 64 * torch.eye(4), atol=1e-6, rtol=0)  # the init survived
    input_ids = torch.randint(1, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)(input_ids).logits
    logits = logits_in_fresh_interpreter(folders, input_ids, str(tmp_path))
    for folder in folders:
        torch.testing.assert_close(logits[folder], expected, atol=1e-4, rtol=0)
