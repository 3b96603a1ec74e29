"""Inputs of the analyses: text files, token chunks and the Hugging Face model.

Texts are tokenized with the model's tokenizer, an EOS token is appended to each document, the
documents are concatenated and cut into consecutive chunks of `seq_length` tokens (the last,
shorter chunk is kept), up to `max_tokens` tokens. No padding: every token of every chunk counts.
"""
import json
from pathlib import Path
from typing import Iterator, List

import torch


class AnalysisError(Exception):
    """A user error (bad model folder, text file, layer or output path): one line, no traceback."""


def read_documents(path: str, json_key: str = "text") -> List[str]:
    """Documents of a .jsonl file (field json_key of each row) or a .txt file (the whole file is one document)."""
    file = Path(path)
    if not file.is_file():
        raise AnalysisError(f"text file not found: {path}")
    if file.suffix == ".txt":
        documents = [file.read_text()]
    elif file.suffix == ".jsonl":
        documents = []
        for number, line in enumerate(file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise AnalysisError(f"{path}:{number} is not JSON: {err.msg}") from None
            if not isinstance(row, dict) or not isinstance(row.get(json_key), str):
                raise AnalysisError(f"{path}:{number} has no text field {json_key!r} (choose it with --json-key)")
            documents.append(row[json_key])
    else:
        raise AnalysisError(f"{path}: expected a .jsonl or .txt file")
    if not any(document.strip() for document in documents):
        raise AnalysisError(f"{path} holds no text")
    return documents


def token_chunks(tokenizer, documents: List[str], seq_length: int, max_tokens: int) -> List[torch.Tensor]:
    """Consecutive chunks (LongTensor [<= seq_length]) of the EOS-separated token stream, max_tokens in all."""
    if tokenizer.eos_token_id is None:
        raise AnalysisError("the model's tokenizer has no EOS token")
    stream: List[int] = []
    for document in documents:
        stream += tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= max_tokens:
            break
    stream = torch.tensor(stream[:max_tokens], dtype=torch.long)
    return list(stream.split(seq_length))


def batches(chunks: List[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Stack consecutive chunks of equal length into batches [B, S] (the short last chunk goes alone)."""
    start = 0
    while start < len(chunks):
        end = start + 1
        while end < len(chunks) and end - start < batch_size and len(chunks[end]) == len(chunks[start]):
            end += 1
        yield torch.stack(chunks[start:end])
        start = end


def load_model(model_dir: str, device: str, dtype: str, trust_remote_code: bool = True):
    """(model, tokenizer) from a Hugging Face folder, in eval mode on device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(model_dir, "config.json").is_file():
        raise AnalysisError(f"not a Hugging Face model folder (no config.json): {model_dir}")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise AnalysisError(f"unknown --dtype {dtype!r}; use float32, bfloat16 or float16")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), tokenizer
