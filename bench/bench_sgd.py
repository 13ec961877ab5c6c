#!/usr/bin/env python
"""SGD (momentum, Nesterov, plain): fusedoptim against torch.optim and the memory-bandwidth limit.

    python bench/bench_sgd.py [fusedoptim-bench options]

A thin wrapper of ``fusedoptim-bench --optimizers sgd,sgd-nesterov,sgd-plain``;
any option of ``fusedoptim-bench --help`` works and wins over these defaults.
"""

from __future__ import annotations

import sys
from typing import List

from fusedoptim.bench import main

DEFAULTS: List[str] = ["--optimizers", "sgd,sgd-nesterov,sgd-plain"]

if __name__ == "__main__":
    sys.exit(main(DEFAULTS + sys.argv[1:], prog="python bench/bench_sgd.py"))
