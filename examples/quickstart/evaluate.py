"""A small self-written evaluation of Hugging Face folders on the corpus's held-out documents, per domain:
mean next-token cross-entropy (and its perplexity) and next-token accuracy (argmax = the actual next token).

The held-out documents are tokenized, EOS-joined and cut into chunks of the training sequence length
exactly as the routing analysis does (router_upcycling.text); every position but a chunk's
last predicts the next token of the same chunk. Runs with transformers alone (no megatron-core).

Shapes: B batch, S chunk length, V vocabulary.
"""
import math
from typing import Dict

import torch

from router_upcycling.analyze.inputs import load_model
from router_upcycling.text import equal_length_batches, read_documents, token_chunks


def score_batch(model, input_ids: torch.Tensor) -> Dict[str, float]:
    """Summed loss, correct predictions and predicted positions of one batch [B, S]."""
    logits = model(input_ids=input_ids).logits[:, :-1].float()  # [B, S - 1, V]
    targets = input_ids[:, 1:]  # [B, S - 1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    correct = (logits.argmax(-1) == targets).sum()
    return {"loss_sum": loss.item(), "correct": correct.item(), "predicted": targets.numel()}


@torch.no_grad()
def evaluate_model(model_dir: str, heldout_files: Dict[str, str], seq_length: int, max_tokens: int,
                   batch_size: int = 16) -> Dict[str, Dict[str, float]]:
    """{domain: {loss, perplexity, accuracy, tokens}} of the model in model_dir on each held-out file."""
    model, tokenizer = load_model(model_dir, "cpu", "float32")
    results = {}
    for domain, path in heldout_files.items():
        totals = {"loss_sum": 0.0, "correct": 0, "predicted": 0}
        chunks = [c for c in token_chunks(read_documents(path), tokenizer, max_tokens, seq_length) if len(c) > 1]
        for batch in equal_length_batches(chunks, batch_size):
            for key, value in score_batch(model, torch.tensor(batch, dtype=torch.long)).items():
                totals[key] += value
        loss = totals["loss_sum"] / totals["predicted"]
        results[domain] = {"loss": round(loss, 4), "perplexity": round(math.exp(loss), 2),
                           "accuracy": round(totals["correct"] / totals["predicted"], 4), "tokens": totals["predicted"]}
    return results
