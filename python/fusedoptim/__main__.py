"""``python -m fusedoptim``: what this build of fusedoptim is and what it uses here."""

from __future__ import annotations

import argparse
import json
from typing import List, Optional

from . import backend_info


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fusedoptim",
        description="Print fusedoptim.backend_info(): the CPU variants built and in use, the CPU features "
                    "found, the threads, and the CUDA backend (built, usable here, or why not).")
    parser.add_argument("--json", action="store_true", help="print the dict as JSON instead of one fact a line")
    args = parser.parse_args(argv)
    info = backend_info()
    print(json.dumps(info, indent=1) if args.json else info)


if __name__ == "__main__":
    main()
