"""Experiments built from every lower layer: the demo, the toy experiment, search problems and
scaling runs, calibration evaluators, flow training with evaluation, and the benchmarks'
library code. The command line (:mod:`cspace.cli`) only parses arguments and prints what these
return.
"""
