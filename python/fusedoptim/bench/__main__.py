"""``python -m fusedoptim.bench``: the same as ``fusedoptim-bench``."""

from . import main

raise SystemExit(main(prog="python -m fusedoptim.bench"))
