"""Convert checkpoints between Hugging Face and Megatron (`router-upcycling-convert`, `tools/convert_checkpoint.py`).

  upcycle  dense HF checkpoint -> megatron-core MoE checkpoint (Router Upcycling or a baseline)
  verify   check that an upcycled checkpoint computes the dense model's logits
  export   Megatron MoE checkpoint -> Hugging Face folder (`mor` remote code, or the family's stock MoE)
  megatron-args  the Megatron-LM flags of a checkpoint's architecture (for pretrain_gpt.py --spec ...)

Every setting is checked before torch, transformers and megatron-core are imported: a refused command takes a
fraction of a second.
"""
import argparse
import sys

from router_upcycling.checkpoint_folder import STORAGE_DTYPE_NAMES
from router_upcycling.cli import OneLineErrorParser, run_command
from router_upcycling.settings.export import export_formats
from router_upcycling.settings.families import FAMILIES
from router_upcycling.settings.routers import AGGREGATIONS, DEFAULT_ROUTER, router_names, routers_help
from router_upcycling.settings.upcycle import (
    AUTO, GQA_ROUTER_INIT, PAPER_CALIBRATION_TOKENS, QK_NORM_SIDE, QK_NORM_SIDES, ROUTER_INITS,
)

# MoESettings' and CalibrationSettings' fields and the upcycle flags that set them
UPCYCLE_FLAGS = {"num_experts": "--num-experts", "topk": "--topk", "router": "--router", "num_routers": "--num-routers",
                 "aggregation": "--router-aggregation", "router_scale": "--router-scale", "calib_files": "--calib-data",
                 "calib_tokens": "--calib-tokens", "calib_seq_length": "--calib-seq-length",
                 "calib_batch_size": "--calib-batch-size", "router_qk_norm": "--router-qk-norm", "router_init": "--router-init",
                 "query_norm": "--router-qk-norm inside", "output": "--output"}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    families = "; ".join(f"{', '.join(f.hf_architectures)}: {f.checkpoints}" for f in FAMILIES)

    up = commands.add_parser("upcycle", help="dense HF checkpoint -> megatron-core MoE checkpoint",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    up.add_argument("--hf-model", required=True, help=f"dense Hugging Face folder ({families})")
    up.add_argument("--output", required=True, help="checkpoint folder to write (written to a temporary folder, then renamed)")
    up.add_argument("--num-experts", type=int, default=8, help="experts per MoE layer (N); each starts as a copy of the dense FFN")
    up.add_argument("--topk", type=int, default=2, help="experts per token (k); the switch router always uses 1")
    up.add_argument("--router", choices=router_names(), default=DEFAULT_ROUTER, help=routers_help())
    up.add_argument("--num-routers", type=int, default=None, help="routers per layer (R) for mor; default: the number of experts")
    up.add_argument("--router-aggregation", choices=AGGREGATIONS, default="sum", help="how mor combines the routers' scores")
    up.add_argument("--router-scale", type=float, default=1.0, help="mor: multiply the expert logits by this (default 1.0, "
                    "the paper's: no scaling); see docs/results.md for why a smaller scale can help small models")
    up.add_argument("--calib-data", nargs="+", default=[], metavar="PATH",
                    help="calibration text for mor's average keys: .jsonl (--calib-json-key field), .txt, or a local dataset folder")
    up.add_argument("--calib-json-key", default="text", help="JSON field holding the text in .jsonl calibration files")
    up.add_argument("--calib-tokens", type=int, default=PAPER_CALIBRATION_TOKENS, help="calibration tokens (paper: 10 x 1024 x 4096)")
    up.add_argument("--calib-seq-length", type=int, default=4096, help="tokens per calibration chunk")
    up.add_argument("--calib-batch-size", type=int, default=None, help="chunks per forward pass (results do not depend on it)")
    up.add_argument("--router-init", choices=(AUTO, *ROUTER_INITS), default=AUTO,
                    help="mor: how the expert keys start. paper: the average keys of the router's heads; query: their "
                         "average queries (grouped-query attention shares keys between heads, not queries); perturb: "
                         "the average keys, exact ties broken by a small deterministic perturbation. auto: paper on "
                         f"multi-head attention, {GQA_ROUTER_INIT} with grouped-query attention or QK-norm (chosen by "
                         "experiment, docs/results.md)")
    up.add_argument("--router-qk-norm", choices=(AUTO, *QK_NORM_SIDES), default=AUTO,
                    help="QK-norm models (Qwen3), mor: take the routers' queries and the average keys before the per-head "
                         "norm (W_q; the mean before q_norm/k_norm), after it (the query norm's weight folded into "
                         "W_q; the mean of the norm's output), or inside: the routers apply the query norm itself "
                         "to W_q x (exact, not linear: no stock export; the routers must divide the heads), keys as "
                         f"after; auto: {QK_NORM_SIDE}; docs/method.md part 2")
    up.add_argument("--dtype", choices=STORAGE_DTYPE_NAMES, default="bf16", help="dtype of the written weights (routers stay fp32)")
    up.add_argument("--seed", type=int, default=1234, help="seed of the random baseline routers")
    up.add_argument("--force", action="store_true", help="replace --output if it exists")

    ver = commands.add_parser("verify", help="compare an upcycled checkpoint's logits with the dense model's",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ver.add_argument("--hf-model", required=True, help="the dense Hugging Face folder it was upcycled from")
    ver.add_argument("--checkpoint", required=True, help="the Megatron MoE checkpoint folder")
    ver.add_argument("--tolerance", type=float, default=1e-3,
                     help="largest allowed |logit difference|; both models run in float32 with the weights as stored, "
                          "so a correct conversion agrees to ~1e-5")
    ver.add_argument("--num-sequences", type=int, default=4, help="random token sequences to compare")
    ver.add_argument("--seq-length", type=int, default=32, help="tokens per sequence")
    ver.add_argument("--long-seq-length", type=int, default=2048, help="tokens of one more, long sequence (capped at "
                     "the model's max_position_embeddings; 0 = none): far positions show what short ones miss, such "
                     "as Llama 3's RoPE scaling")

    exp = commands.add_parser("export", help="Megatron MoE checkpoint -> Hugging Face folder",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    exp.add_argument("--checkpoint", required=True, help="folder written by upcycle or a training --save folder")
    exp.add_argument("--output", required=True, help="Hugging Face folder to write")
    stock = ", ".join(f"{f.stock.format} ({f.stock.architecture}, for {f.display} models)" for f in FAMILIES)
    exp.add_argument("--format", required=True, choices=export_formats(),
                     help=f"mor: our modeling code (trust_remote_code), every router; stock: the model family's own MoE "
                          f"in plain transformers, routers that fold to a linear gate only ({stock}; these names work "
                          "too, for their family)")
    exp.add_argument("--iteration", type=int, default=None, help="iteration to export; default: the latest complete one")
    exp.add_argument("--dtype", choices=STORAGE_DTYPE_NAMES, default="bf16", help="dtype of the written weights")
    exp.add_argument("--force", action="store_true", help="replace --output if it exists")

    margs = commands.add_parser("megatron-args", help="print the Megatron-LM flags of a checkpoint's architecture",
                                description="Print the Megatron-LM flags that describe a checkpoint of ours (upcycled, "
                                "or a training --save folder): the architecture, the MoE and our layer spec "
                                "(--spec router_upcycling.megatron_lm.spec layer_spec), for pretrain_gpt.py. "
                                "python -m router_upcycling.megatron_lm adds them itself.")
    margs.add_argument("--checkpoint", required=True, help="checkpoint folder (holding router_upcycling.json)")
    return parser


def run_upcycle(args) -> int:
    from router_upcycling.settings.moe import MoESettings
    from router_upcycling.settings.upcycle import CalibrationSettings, check_upcycle

    moe = MoESettings(num_experts=args.num_experts, topk=args.topk, router=args.router,
                      num_routers=args.num_routers, aggregation=args.router_aggregation, router_scale=args.router_scale,
                      query_norm=args.router_qk_norm == "inside")
    calib = CalibrationSettings(files=args.calib_data, json_key=args.calib_json_key, tokens=args.calib_tokens,
                                seq_length=args.calib_seq_length, batch_size=args.calib_batch_size,
                                qk_norm=args.router_qk_norm, router_init=args.router_init)
    check_upcycle(args.hf_model, args.output, moe, calib, args.force)
    from router_upcycling.convert.upcycle import upcycle

    path = upcycle(args.hf_model, args.output, moe, calib, dtype=args.dtype, seed=args.seed, force=args.force)
    print(f"wrote {path}")
    from router_upcycling.checkpoint_folder import read_checkpoint_settings
    from router_upcycling.megatron_lm.flags import format_flags, megatron_flags

    _, arch, moe = read_checkpoint_settings(path)
    print("Megatron-LM flags of its architecture (pretrain_gpt.py; python -m router_upcycling.megatron_lm adds them):")
    print(format_flags(megatron_flags(arch, moe)))
    return 0


def run_verify(args) -> int:
    from router_upcycling.checkpoint_folder import read_checkpoint_settings
    from router_upcycling.errors import UserError

    for flag, value, least in (("--num-sequences", args.num_sequences, 1), ("--seq-length", args.seq_length, 1),
                               ("--long-seq-length", args.long_seq_length, 0)):
        if value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")
    if not 0 < args.tolerance < float("inf"):
        raise UserError(f"--tolerance must be a positive number, got {args.tolerance}")
    from router_upcycling.settings.architecture import read_dense_model

    read_dense_model(args.hf_model)
    read_checkpoint_settings(args.checkpoint)
    from router_upcycling.convert.verify import verify

    report = verify(args.hf_model, args.checkpoint, args.num_sequences, args.seq_length, args.long_seq_length)
    verdict = "OK" if report.passed(args.tolerance) else "FAIL"
    print(f"max |logit difference| = {report.max_abs_diff:.3e} (tolerance {args.tolerance:g}); "
          f"top-1 agreement = {100 * report.top1_agreement:.2f}% over {report.num_tokens} tokens "
          f"({' and '.join(report.batches)}): {verdict}")
    return 0 if verdict == "OK" else 1


def run_export(args) -> int:
    from router_upcycling.errors import UserError
    from router_upcycling.settings.export import check_export

    if args.iteration is not None and args.iteration < 0:
        raise UserError(f"--iteration must be a saved iteration (0 or more), got {args.iteration}")
    check_export(args.checkpoint, args.output, args.format, args.force)
    from router_upcycling.convert.export import export

    path = export(args.checkpoint, args.output, args.format, iteration=args.iteration, dtype=args.dtype, force=args.force)
    print(f"wrote {path}")
    return 0


def run_megatron_args(args) -> int:
    from router_upcycling.checkpoint_folder import read_checkpoint_settings
    from router_upcycling.megatron_lm.flags import format_flags, megatron_flags

    _, arch, moe = read_checkpoint_settings(args.checkpoint)
    print(format_flags(megatron_flags(arch, moe)))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    command = {"upcycle": run_upcycle, "verify": run_verify, "export": run_export,
               "megatron-args": run_megatron_args}[args.command]
    return run_command(lambda: command(args), flags=UPCYCLE_FLAGS)


if __name__ == "__main__":
    sys.exit(main())
