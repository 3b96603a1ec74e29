"""The router math, seen from beside the modeling file.

`modeling_mor.py` imports the router math relatively (`from .mor import ...`) because transformers'
remote-code loader copies only files named by relative imports into its module cache. An exported
folder holds the real `router_upcycling/mor.py` under this name; inside the package this file
re-exports it, so the math keeps its one home.
"""
from router_upcycling.mor import *  # noqa: F401,F403
from router_upcycling.mor import grap_expert_logits, mor_expert_logits  # noqa: F401  (named explicitly for readers and linters)
