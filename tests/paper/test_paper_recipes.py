"""configs/paper/: one recipe per run of the paper's Tables 1-4, each checked against the paper and parsed by the
real command-line parsers of its stages."""
import importlib.util
from pathlib import Path

import pytest
import yaml

from router_upcycling.analyze.__main__ import build_parser as analyze_parser
from router_upcycling.eval.__main__ import build_parser as eval_parser
from router_upcycling.settings.moe import MoESettings
from router_upcycling.settings.routers import check_router_count, router_names
from router_upcycling.paper.recipes import CONFIG_DIR, RUN_NAMES, RecipeError, flag_argv, load_recipe
from router_upcycling.train.config import build_parser as train_parser
from router_upcycling.train.config import parse_args

REPO = Path(__file__).resolve().parents[2]

# Qwen1.5 backbones: query heads and head dim (method.md; Table 2: 8x1.8B has d = 2048, 16 heads of 128)
BACKBONES = {"Qwen1.5-0.5B": (16, 64), "Qwen1.5-1.8B": (16, 128)}

# run: (backbone, router, experts N, top-k, routers R, aggregation, router dim d_r) as the paper's tables say
PAPER = {
    "scratch": ("Qwen1.5-0.5B", "linear", 8, 2, None, None, None),
    "vanilla": ("Qwen1.5-0.5B", "linear", 8, 2, None, None, None),
    "switch": ("Qwen1.5-0.5B", "switch", 8, 1, None, None, None),
    "locmoe": ("Qwen1.5-0.5B", "locmoe", 8, 2, None, None, None),
    "mlp": ("Qwen1.5-0.5B", "mlp", 8, 2, None, None, None),
    "mor": ("Qwen1.5-0.5B", "mor", 8, 2, 8, "sum", 128),
    "8x1.8b-vanilla": ("Qwen1.5-1.8B", "linear", 8, 2, None, None, None),
    "8x1.8b-mor": ("Qwen1.5-1.8B", "mor", 8, 2, 8, "sum", 256),
    "16x0.5b-vanilla": ("Qwen1.5-0.5B", "linear", 16, 2, None, None, None),
    "16x0.5b-mor": ("Qwen1.5-0.5B", "mor", 16, 2, 16, "sum", 64),
    "r2": ("Qwen1.5-0.5B", "mor", 8, 2, 2, "sum", 512),
    "r4": ("Qwen1.5-0.5B", "mor", 8, 2, 4, "sum", 256),
    "r16": ("Qwen1.5-0.5B", "mor", 8, 2, 16, "sum", 64),
    "r32": ("Qwen1.5-0.5B", "mor", 8, 2, 32, "sum", 32),
    "max": ("Qwen1.5-0.5B", "mor", 8, 2, 8, "max", 128),
}
TABLE_3_KEYS = {"r2": 8, "r4": 8, "mor": 8, "r16": 16, "r32": 32}  # Table 3's K row


def convert_parser():
    spec = importlib.util.spec_from_file_location("convert_checkpoint_tool", REPO / "tools" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def router_on_this_branch(router: str) -> None:
    if router not in router_names():
        pytest.skip(f"the {router} router is not in this checkout (routers: {', '.join(router_names())})")


def test_one_recipe_per_run_and_no_other():
    files = {path.stem for path in CONFIG_DIR.glob("*.yaml")} - {"base"}
    assert files == set(RUN_NAMES) == set(PAPER)


@pytest.mark.parametrize("name", RUN_NAMES)
def test_recipe_follows_the_paper(name):
    recipe = load_recipe(name)
    backbone, router, experts, topk, routers, aggregation, router_dim = PAPER[name]
    assert recipe.backbone == backbone
    if name == "scratch":
        assert recipe.upcycle is None and recipe.stages == ["train", "export", "eval", "routing"]
        train = recipe.train
        assert (train["from-scratch"], train["moe-router-type"], train["num-experts"], train["moe-router-topk"]) == (True, router, experts, topk)
        assert train["init-method-std"] == 0.02
    else:
        up = recipe.upcycle
        assert (up["router"], up["num-experts"], up["topk"]) == (router, experts, topk)
        assert (up.get("num-routers"), up.get("router-aggregation")) == (routers, aggregation)
        assert (up["calib-tokens"], up["calib-seq-length"]) == (10 * 1024 * 4096, 4096)  # 10 iterations x 1024 x 4096
        assert recipe.needs_calibration == (router == "mor")
    if routers:
        heads, head_dim = BACKBONES[backbone]
        check_router_count(heads, head_dim, routers, experts)
        assert heads * head_dim // routers == router_dim
        assert MoESettings(num_experts=experts, num_routers=routers).num_keys == TABLE_3_KEYS.get(name, experts)
    # section 4.1: 64 GPUs, data parallel, micro-batch 4, global batch 1024 x 4096, 25,600 steps = 100B tokens
    train = recipe.train
    assert (train["micro-batch-size"], train["global-batch-size"], train["seq-length"], train["train-iters"]) == (4, 1024, 4096, 25600)
    assert (train["tensor-model-parallel-size"], train["pipeline-model-parallel-size"], train["expert-model-parallel-size"]) == (1, 1, 1)
    assert recipe.slurm["train"][:3] == ["--nodes=8", "--ntasks-per-node=1", "--gpus-per-node=8"]
    assert (recipe.export["format"], recipe.eval["tasks"], recipe.eval["num-fewshot"]) == ("mor", "paper", 0)


@pytest.mark.parametrize("profile", [None, "toy_cpu"])
@pytest.mark.parametrize("name", RUN_NAMES)
def test_recipe_parses_with_the_stages_own_parsers(name, profile, tmp_path):
    recipe = load_recipe(name, profile)
    router_on_this_branch(recipe.upcycle["router"] if recipe.upcycle else recipe.train["moe-router-type"])
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(recipe.train))
    source = ["--model-config", "DENSE"] if recipe.upcycle is None else ["--pretrained-checkpoint", "CKPT"]
    cpu = [] if profile else ["--transformer-impl", "local", "--no-moe-grouped-gemm"]  # the paper's CUDA-only kernels
    args = parse_args(["--config", str(config), *cpu, *source, "--data-path", "DATA", "--load", "RUN", "--save", "RUN"])
    assert args.train_iters == recipe.train_iters and args.bf16
    convert = convert_parser()
    if recipe.upcycle is not None:
        upcycle = convert.parse_args(["upcycle", "--hf-model", "DENSE", "--output", "OUT", "--calib-data", "C", *flag_argv(recipe.upcycle)])
        assert (upcycle.router, upcycle.num_experts, upcycle.topk) == (recipe.upcycle["router"], recipe.upcycle["num-experts"], recipe.upcycle["topk"])
    convert.parse_args(["export", "--checkpoint", "RUN", "--output", "HF", *flag_argv(recipe.export)])
    assert eval_parser().parse_args(["--model", "HF", *flag_argv(recipe.eval)]).tasks == "paper"
    analyze_parser().parse_args(["routing", "--model", "HF", "--domain", "a=b", "--output", "O", *flag_argv(recipe.routing)])


def test_training_flags_are_the_paper_recipe_file_plus_the_run_changes():
    base = yaml.safe_load((REPO / "configs" / "train" / "qwen1.5_8x0.5b_mor.yaml").read_text())
    known = {action.dest.replace("_", "-") for action in train_parser()._actions}
    for name in RUN_NAMES:
        recipe = load_recipe(name)
        changed = {key for key in recipe.train if recipe.train[key] != base.get(key)}
        assert changed <= {"from-scratch", "moe-router-type", "num-experts", "moe-router-topk", "init-method-std",
                           "locmoe-locality-coeff"}, name
        assert set(base) <= known


def test_profile_and_overrides_change_sizes_not_the_run():
    toy = load_recipe("mor", "toy_cpu", ["train.lr=1e-3", "train.train-iters=3", "eval.limit=5"])
    assert (toy.train["lr"], toy.train_iters, toy.eval["limit"], toy.train["seq-length"]) == (1e-3, 3, 5, 64)
    assert (toy.upcycle["router"], toy.upcycle["num-routers"], toy.upcycle["calib-tokens"]) == ("mor", 8, 1024)
    assert toy.train_processes_per_node == 1 and toy.slurm["train"][0] == "--nodes=1"
    assert load_recipe("scratch", "toy_cpu", ["upcycle.num-experts=4"]).upcycle is None


@pytest.mark.parametrize("override,message", [
    ("lr=1", "SECTION.FLAG=VALUE"), ("model.lr=1", "SECTION.FLAG=VALUE"), ("train.lr", "SECTION.FLAG=VALUE"),
])
def test_bad_overrides_are_refused(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("mor", overrides=[override])


def test_unknown_run_and_profile_are_refused():
    with pytest.raises(RecipeError, match="unknown run 'mixtral'; runs: all, scratch, vanilla"):
        load_recipe("mixtral")
    with pytest.raises(RecipeError, match="profile 'huge' not found .*toy_cpu"):
        load_recipe("mor", "huge")
