"""The dense model the demo upcycles: a byte-level BPE tokenizer and a small Qwen2ForCausalLM, trained from
scratch on the corpus's training set with a plain torch loop, saved as a Hugging Face folder.

The model has the architecture of Qwen1.5/Qwen2 (RMSNorm, rotary embeddings, SwiGLU FFN, q/k/v biases,
tied embeddings), only smaller. Training: AdamW, linear warmup then cosine decay to a tenth of the peak,
gradient clipping at 1, batches of random windows of the EOS-joined token stream.

Shapes: B batch, S sequence length, V vocabulary.
"""
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import List, Optional

import torch
from tqdm import tqdm

from router_upcycling.outputs import staged_output
from router_upcycling.testing import dense_config, train_tokenizer


@dataclass(frozen=True)
class DenseSettings:
    """Tokenizer, architecture and training of the dense model."""

    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: Optional[int] = None  # grouped-query attention when fewer than num_heads (None: as many)
    family: str = "qwen2"  # qwen2 (q/k/v biases) or qwen3 (QK-norm, no biases)
    head_dim: Optional[int] = None  # None: hidden_size / num_heads
    intermediate_size: int = 448  # 3.5 x hidden, about Qwen's ratio
    seq_length: int = 128
    batch_size: int = 16
    steps: int = 400
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1


def read_texts(jsonl_path: str) -> List[str]:
    with open(jsonl_path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def token_stream(tokenizer, texts: List[str]) -> torch.Tensor:
    """All documents tokenized, each followed by EOS, concatenated: LongTensor [T]."""
    ids: List[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids += encoded + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def random_windows(stream: torch.Tensor, batch_size: int, seq_length: int, generator: torch.Generator) -> torch.Tensor:
    """[B, S + 1] windows starting at random positions of the stream (inputs and shifted targets)."""
    starts = torch.randint(0, len(stream) - seq_length - 1, (batch_size,), generator=generator)
    return torch.stack([stream[start:start + seq_length + 1] for start in starts.tolist()])


def learning_rate(step: int, settings: DenseSettings) -> float:
    """Linear warmup to lr, then cosine decay to lr / 10 at the last step (step counts from 0)."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def build_model(settings: DenseSettings, vocab_size: int, seed: int):
    """A dense model of the settings' family (Qwen2ForCausalLM by default) with the library's usual initialisation
    (normal, std 0.02)."""
    import transformers

    from router_upcycling.settings.families import family_named

    config = dense_config(settings.family, vocab_size=vocab_size, hidden_size=settings.hidden_size,
                          num_layers=settings.num_layers, num_heads=settings.num_heads, num_kv_heads=settings.num_kv_heads,
                          head_dim=settings.head_dim, intermediate_size=settings.intermediate_size, tied=True,
                          max_position_embeddings=max(256, settings.seq_length))
    torch.manual_seed(seed)
    return getattr(transformers, family_named(settings.family).hf_architectures[0])(config)


def train(model, stream: torch.Tensor, settings: DenseSettings, seed: int) -> List[dict]:
    """Train in place for settings.steps steps; returns the per-step log [{step, loss, lr}]."""
    decay = [p for name, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for name, p in model.named_parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    log = []
    bar = tqdm(range(settings.steps), desc="dense pretraining", unit="step", mininterval=2.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        windows = random_windows(stream, settings.batch_size, settings.seq_length, generator)  # [B, S + 1]
        loss = model(input_ids=windows[:, :-1], labels=windows[:, :-1]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        log.append({"step": step + 1, "loss": round(loss.item(), 5), "lr": optimizer.param_groups[0]["lr"]})
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return log


def train_saved_tokenizer(texts: List[str], vocab_size: int, folder: str):
    """Train the byte-level BPE tokenizer, save it to folder and return it as read back from there.

    Read back, because that is the tokenizer every later tool gets: transformers' Qwen2 tokenizer replaces
    the pre-tokenizer on loading (Qwen2's regex, one digit per piece), so the object in memory would cut the
    training text differently from tools/preprocess_data.py and the evaluation.
    """
    from transformers import AutoTokenizer

    train_tokenizer(texts, vocab_size=vocab_size).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def pretrain_dense(train_jsonl: str, output_dir: str, settings: DenseSettings = DenseSettings(), seed: int = 0,
                   force: bool = False) -> str:
    """Train the tokenizer and the dense model on train_jsonl; write the Hugging Face folder output_dir.

    Besides the model and tokenizer files the folder holds pretrain_log.jsonl (loss per step) and
    pretrain_settings.json. Written to a temporary folder, then renamed.
    """
    torch.manual_seed(seed)
    texts = read_texts(train_jsonl)
    with staged_output(output_dir, force) as staging:
        started = time.time()
        tokenizer = train_saved_tokenizer(texts, settings.vocab_size, staging)
        stream = token_stream(tokenizer, texts)
        print(f"  tokenizer: {len(tokenizer)} tokens, {len(stream):,} training tokens "
              f"({sum(map(len, texts)) / len(stream):.2f} characters per token) in {time.time() - started:.0f} s", flush=True)
        # rows past the tokenizer's size are padding, as in Qwen's checkpoints; a multiple of 128 divides any TP size
        model = build_model(settings, -(-len(tokenizer) // 128) * 128, seed)
        print(f"  model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)
        log = train(model, stream, settings, seed)
        model.save_pretrained(staging)
        with open(os.path.join(staging, "pretrain_log.jsonl"), "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in log)
        with open(os.path.join(staging, "pretrain_settings.json"), "w") as f:
            json.dump({**asdict(settings), "seed": seed, "training_tokens": len(stream)}, f, indent=2)
    return output_dir
