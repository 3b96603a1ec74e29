"""Analyses of Hugging Face MoE folders: routing diversity, expert specialisation, expert load, routing health.

Run `python -m router_upcycling.analyze --help`. Works through forward hooks on each layer's
`mlp.gate` (see hooks.py), so any model meeting that contract works. Never imports megatron-core.
"""
