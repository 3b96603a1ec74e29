"""Evaluation with lm-evaluation-harness: the paper's ten zero-shot tasks on a Hugging Face folder.

Run `python -m router_upcycling.eval --help`. Never imports megatron-core (runs on inference boxes).
"""
