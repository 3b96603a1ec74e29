from router_upcycling.cli import setup_logging

# before megatron-core is imported: it warns about missing Apex/Transformer Engine at import time
setup_logging()

from router_upcycling.train.cli import main  # noqa: E402

# the guard matters: megatron's checkpoint writer starts processes that re-import the main module
if __name__ == "__main__":
    main()
