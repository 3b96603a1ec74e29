"""Training data: megatron-core GPT datasets over indexed `.bin/.idx` files, and the per-rank batch order.

Sample order follows Megatron-LM's pretraining sampler: global batch g covers samples
[g*B, (g+1)*B) (B = global batch); its micro-batch m on data-parallel rank r takes
[g*B + m*b*D + r*b, ... + b) (b = micro batch, D = data-parallel size). So the set of micro-batches
of a step does not depend on D, and the position in the data is the number of consumed samples.

Shapes: b micro batch, s sequence length.
"""
import argparse
import os
from typing import Dict, Iterator, List

import torch

from router_upcycling.train.arguments import TrainError


class MegatronTokenizerAdapter:
    """The two facts megatron-core's GPT dataset reads from a tokenizer: the vocabulary size and the EOD id.

    No `pad` attribute on purpose: Qwen's pad token is its EOD token, and the dataset must not mask
    real end-of-document tokens as padding (it then pads with an id that never occurs).
    """

    def __init__(self, hf_tokenizer) -> None:
        if hf_tokenizer.eos_token_id is None:
            raise TrainError("the tokenizer has no end-of-document (eos) token")
        self.vocab_size = len(hf_tokenizer)
        self.eod = hf_tokenizer.eos_token_id
        # part of the dataset cache key (megatron hashes it): the sample order depends only on these
        self.unique_identifiers = {"class": type(self).__name__, "vocab_size": self.vocab_size, "eod": self.eod}


def load_tokenizer(tokenizer_dir: str) -> MegatronTokenizerAdapter:
    from transformers import AutoTokenizer

    if not os.path.isdir(tokenizer_dir):
        raise TrainError(f"tokenizer folder not found: {tokenizer_dir}")
    return MegatronTokenizerAdapter(AutoTokenizer.from_pretrained(tokenizer_dir))


def parse_blend(data_path: List[str]):
    """megatron-core's blend ([prefixes], [weights] or None) after checking every prefix's files exist."""
    from megatron.core.datasets.utils import get_blend_from_list

    if len(data_path) > 1 and len(data_path) % 2 == 0:
        try:
            [float(w) for w in data_path[0::2]]
        except ValueError:
            raise TrainError("--data-path blend must alternate weights and prefixes: '0.3 PREFIX_A 0.7 PREFIX_B'") from None
    blend = get_blend_from_list(data_path)
    for prefix in blend[0]:
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                raise TrainError(f"dataset file not found: {prefix + suffix} (--data-path takes prefixes of .bin/.idx pairs)")
    return blend


def build_datasets(args: argparse.Namespace, tokenizer: MegatronTokenizerAdapter, data_parallel_size: int):
    """(train, validation) megatron-core datasets sized for the run; validation is None when its split is empty."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=parse_blend(args.data_path),
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=False,  # the causal mask is built once per shape by the trainer
        data_parallel_size=data_parallel_size,
    )
    eval_samples = args.eval_iters * args.global_batch_size
    sizes = [args.train_iters * args.global_batch_size, eval_samples, 0]
    try:
        train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    except (AssertionError, ValueError) as err:
        raise TrainError(f"cannot build datasets from --data-path/--split: {err or type(err).__name__}") from None
    if train is None or len(train) == 0:
        raise TrainError("the training split is empty: check --split and the size of --data-path")
    if valid is not None and len(valid) == 0:
        valid = None
    return train, valid


def microbatch_indices(consumed_samples: int, global_batch_size: int, micro_batch_size: int,
                       dp_rank: int, dp_size: int) -> List[List[int]]:
    """Sample indices of this rank's micro-batches for the global batch starting at consumed_samples."""
    stride = micro_batch_size * dp_size
    return [
        list(range(consumed_samples + m * stride + dp_rank * micro_batch_size,
                   consumed_samples + m * stride + (dp_rank + 1) * micro_batch_size))
        for m in range(global_batch_size // stride)
    ]


def collate(dataset, indices: List[int], device: torch.device) -> Dict[str, torch.Tensor]:
    """tokens, labels, position_ids [b, s] (int64) and loss_mask [b, s] (float) on `device`."""
    samples = [dataset[i % len(dataset)] for i in indices]
    return {key: torch.stack([s[key] for s in samples]).to(device) for key in ("tokens", "labels", "loss_mask", "position_ids")}


def global_batch_iterator(dataset, consumed_samples: int, args: argparse.Namespace, dp_rank: int, dp_size: int,
                          device: torch.device) -> Iterator[Dict[str, torch.Tensor]]:
    """This rank's micro-batches of one global batch, in order (megatron's schedules pull them with next())."""
    for indices in microbatch_indices(consumed_samples, args.global_batch_size, args.micro_batch_size, dp_rank, dp_size):
        yield collate(dataset, indices, device)


def check_batch_sizes(args: argparse.Namespace, dp_size: int) -> int:
    """The number of micro-batches per step (gradient accumulation)."""
    stride = args.micro_batch_size * dp_size
    if args.global_batch_size % stride:
        raise TrainError(f"--global-batch-size {args.global_batch_size} is not a multiple of --micro-batch-size x "
                         f"data-parallel size ({args.micro_batch_size} x {dp_size})")
    return args.global_batch_size // stride

