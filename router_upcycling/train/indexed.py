"""The files of a megatron-core indexed dataset (PREFIX.bin/.idx), read without megatron-core: the index's header
(token dtype, sequence count) and the largest token id of the data. Pure Python and numpy, so training refuses data
that does not fit the model before torch is imported.

Index layout (megatron.core.datasets.indexed_dataset): 9 magic bytes, version <Q, dtype code <B, sequence count <Q,
document count <Q, then the per-sequence arrays. The .bin file is the token ids, back to back, in that dtype.
"""
import dataclasses
import os
import struct
from typing import List

import numpy

from router_upcycling.train.config import TrainError, data_prefixes

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_DTYPES = {1: numpy.uint8, 2: numpy.int8, 3: numpy.int16, 4: numpy.int32, 5: numpy.int64, 6: numpy.float64,
                7: numpy.float32, 8: numpy.uint16}
WHOLE_SCAN_TOKENS = 1 << 28  # files up to this many tokens (1 GiB of int32) are read whole
SCAN_BLOCKS, SCAN_BLOCK_TOKENS = 256, 1 << 20  # larger ones: evenly spaced blocks of consecutive tokens


@dataclasses.dataclass(frozen=True)
class IndexHeader:
    dtype: type
    sequence_count: int  # one sequence per document for the files tools/preprocess_data.py writes


def read_index_header(prefix: str) -> IndexHeader:
    path = prefix + ".idx"
    with open(path, "rb") as f:
        head = f.read(len(INDEX_MAGIC) + 8 + 1 + 8)
    if len(head) < len(INDEX_MAGIC) + 17 or not head.startswith(INDEX_MAGIC):
        raise TrainError(f"--data-path {prefix}: {path} is not a megatron-core index (damaged or another format)")
    code = head[len(INDEX_MAGIC) + 8]
    if code not in INDEX_DTYPES:
        raise TrainError(f"--data-path {prefix}: {path} names an unknown token dtype (code {code})")
    (sequences,) = struct.unpack("<Q", head[len(INDEX_MAGIC) + 9:])
    return IndexHeader(INDEX_DTYPES[code], sequences)


def largest_token_id(prefix: str, dtype: type) -> int:
    """The largest token id of PREFIX.bin (-1 when empty): exact for files up to WHOLE_SCAN_TOKENS tokens; beyond,
    the largest in SCAN_BLOCKS evenly spaced blocks, which a tokenizer of another vocabulary cannot slip through
    (its out-of-range ids are spread over the whole file), at a bounded cost on terabyte corpora."""
    tokens = os.path.getsize(prefix + ".bin") // numpy.dtype(dtype).itemsize
    if tokens == 0:
        return -1
    data = numpy.memmap(prefix + ".bin", dtype=dtype, mode="r", shape=(tokens,))
    if tokens <= WHOLE_SCAN_TOKENS:
        starts: List[int] = list(range(0, tokens, SCAN_BLOCK_TOKENS))
    else:
        starts = [int(i * (tokens - SCAN_BLOCK_TOKENS) / (SCAN_BLOCKS - 1)) for i in range(SCAN_BLOCKS)]
    return int(max(data[start:start + SCAN_BLOCK_TOKENS].max() for start in starts))


def check_token_ids(data_path: List[str], vocab_size: int) -> None:
    """Every dataset of --data-path holds only token ids the model has embeddings for (else an index error deep in
    the embedding, or silently wrong training on GPUs)."""
    for prefix in data_prefixes(data_path):
        dtype = read_index_header(prefix).dtype
        if numpy.issubdtype(dtype, numpy.integer) and numpy.iinfo(dtype).max < vocab_size:
            continue  # the dtype cannot hold an id out of range
        largest = largest_token_id(prefix, dtype)
        if largest >= vocab_size:
            raise TrainError(f"--data-path {prefix} holds token id {int(largest)}, but the model's vocabulary has "
                             f"{vocab_size} tokens: the data was tokenized for another model (tools/preprocess_data.py "
                             "--tokenizer-model must be this model's tokenizer)")


def split_document_counts(split_matrix, documents: int) -> List[int]:
    """Documents per split as megatron-core's dataset builder cuts them (its rounding), 0 for a split it leaves out."""
    return [0 if bounds is None else int(round(bounds[1] * documents)) - int(round(bounds[0] * documents))
            for bounds in split_matrix]
