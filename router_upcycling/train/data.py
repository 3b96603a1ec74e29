"""Training data: megatron-core GPT datasets over indexed `.bin/.idx` files, and the per-rank batch order.

Sample order follows Megatron-LM's pretraining sampler: global batch g covers samples
[g*B, (g+1)*B) (B = global batch); its micro-batch m on data-parallel rank r takes
[g*B + m*b*D + r*b, ... + b) (b = micro batch, D = data-parallel size). So the set of micro-batches
of a step does not depend on D, and the position in the data is the number of consumed samples.

Shapes: b micro batch, s sequence length.
"""
import os
from typing import Dict, Iterator, List

import torch

from router_upcycling.train.config import TrainError, TrainingConfig, check_data_files, data_prefixes
from router_upcycling.train.indexed import read_index_header, split_document_counts


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
    """megatron-core's blend ([prefixes], [weights] or None), after checking every prefix's files exist."""
    from megatron.core.datasets.utils import get_blend_from_list

    check_data_files(data_path)
    return get_blend_from_list(data_path)


def build_datasets(config: TrainingConfig, tokenizer: MegatronTokenizerAdapter, data_parallel_size: int):
    """(train, validation) megatron-core datasets sized for the run; validation is None when its split is empty."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    dataset_config = GPTDatasetConfig(
        random_seed=config.seed,
        sequence_length=config.seq_length,
        blend=parse_blend(config.data_path),
        split=config.split,
        path_to_cache=config.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=config.eod_mask_loss,
        create_attention_mask=False,  # the causal mask is built once per shape by the trainer
        data_parallel_size=data_parallel_size,
    )
    eval_samples = config.eval_iters * config.global_batch_size
    sizes = [config.train_iters * config.global_batch_size, eval_samples, 0]
    check_split_documents(config, dataset_config.split_matrix)
    try:
        train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, dataset_config).build()
    except (AssertionError, ValueError) as err:
        raise TrainError(f"cannot build datasets from --data-path/--split: {err or type(err).__name__}") from None
    if train is None or len(train) == 0:
        raise TrainError("the training split is empty: check --split and the size of --data-path")
    if valid is not None and len(valid) == 0:
        valid = None
    return train, valid


def check_split_documents(config: TrainingConfig, split_matrix) -> None:
    """Every split --split gives a share gets at least one document of every dataset: megatron-core's builder builds
    each such split, even one no samples are asked of, and loops forever looking for the tokens of an empty one."""
    for prefix in data_prefixes(config.data_path):
        documents = read_index_header(prefix).sequence_count
        counts = split_document_counts(split_matrix, documents)
        for name, bounds, count in zip(("training", "validation", "test"), split_matrix, counts):
            if bounds is not None and count == 0:
                raise TrainError(f"--split {config.split} gives the {name} split none of the {documents} documents "
                                 f"of {prefix}: give it a larger share, more documents, or 0 to leave it out")


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


def global_batch_iterator(dataset, consumed_samples: int, config: TrainingConfig, dp_rank: int, dp_size: int,
                          device: torch.device) -> Iterator[Dict[str, torch.Tensor]]:
    """This rank's micro-batches of one global batch, in order (megatron's schedules pull them with next())."""
    for indices in microbatch_indices(consumed_samples, config.global_batch_size, config.micro_batch_size, dp_rank, dp_size):
        yield collate(dataset, indices, device)


def check_batch_sizes(config: TrainingConfig, dp_size: int) -> int:
    """The number of micro-batches per step (gradient accumulation)."""
    stride = config.micro_batch_size * dp_size
    if config.global_batch_size % stride:
        raise TrainError(f"--global-batch-size {config.global_batch_size} is not a multiple of --micro-batch-size x "
                         f"data-parallel size ({config.micro_batch_size} x {dp_size})")
    return config.global_batch_size // stride

