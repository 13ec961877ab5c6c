#!/usr/bin/env python
"""Adam and AdamW: fusedoptim against torch.optim and the memory-bandwidth limit.

    python bench/bench_adam.py [fusedoptim-bench options]

A thin wrapper of ``fusedoptim-bench --optimizers adam,adamw``; any option of
``fusedoptim-bench --help`` works and wins over these defaults (for instance
``--optimizers adam --quick`` or ``--json out.json --plot out.png``).
"""

from __future__ import annotations

import sys
from typing import List

from fusedoptim.bench import main

DEFAULTS: List[str] = ["--optimizers", "adam,adamw"]

if __name__ == "__main__":
    sys.exit(main(DEFAULTS + sys.argv[1:], prog="python bench/bench_adam.py"))
