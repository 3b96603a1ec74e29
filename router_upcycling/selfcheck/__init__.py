"""`python -m router_upcycling.selfcheck`: is this toolkit correct on this machine, and how fast is it here?

Three stages, each through the code that training and conversion run (no copies of it):
- parity (router_upcycling.selfcheck.parity): the Mixture-of-Routers router and a tiny upcycled model on this
  device against a CPU float32 reference, `verify` on this device, and Transformer Engine's layers against the
  local ones on the same weights where Transformer Engine imports;
- calibration speed (selfcheck.speed): the average-key pass of `upcycle` on a random dense model of the chosen size;
- throughput (selfcheck.speed): training steps of the chosen size through train.build / train.step with the
  8x0.5B recipe's speed options, on one GPU and, under torchrun, on every GPU of the node.

The figures and their meaning are in docs/performance.md ("GPU self-check").
"""
