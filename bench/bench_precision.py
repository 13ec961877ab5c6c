#!/usr/bin/env python
"""Precision options: each option's Adam step against its own byte limit.

    python bench/bench_precision.py [fusedoptim-bench options]

A thin wrapper of ``fusedoptim-bench --suite precision``: master_weights,
stochastic_rounding and kahan_summation on bf16 params, state_dtype=bf16 and
max_grad_norm on fp32 params, on one 16M-param tensor (and fp32 + bf16 states
against torch fused fp32 on one 2**27-param tensor), 1 thread and all cores.
Any option of ``fusedoptim-bench --help`` works and wins over these defaults
(``--optimizers adam,sgd``, ``--cases 1x4M``, ``--options max_grad_norm``,
``--json``/``--csv``/``--plot``/``--markdown``).
"""

from __future__ import annotations

import sys
from typing import List

from fusedoptim.bench import main

DEFAULTS: List[str] = ["--suite", "precision"]

if __name__ == "__main__":
    sys.exit(main(DEFAULTS + sys.argv[1:], prog="python bench/bench_precision.py"))
