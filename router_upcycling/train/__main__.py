from router_upcycling.train.trainer import main

# the guard matters: megatron's checkpoint writer starts processes that re-import the main module
if __name__ == "__main__":
    main()
