"""Training with megatron-core: `python -m router_upcycling.train` (see trainer.py and arguments.py)."""
