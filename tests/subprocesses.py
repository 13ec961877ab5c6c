"""Several Python subprocesses run side by side.

Each one spends seconds importing torch, so the tests that need several
(an environment variable read at import, the command-line tools) start them
all, then wait for each."""

from __future__ import annotations

import subprocess
from typing import Any, Dict, Hashable, Mapping, Sequence, Tuple


def run_at_once(jobs: Mapping[Hashable, Tuple[Sequence[str], Dict[str, Any]]],
                timeout: float = 300) -> Dict[Hashable, subprocess.CompletedProcess]:
    """``jobs``: key -> (argv, keyword arguments of ``subprocess.Popen`` such
    as ``env`` and ``cwd``). Starts every job, then returns key -> the
    completed process, its stdout and stderr captured as text."""
    started = {key: (argv, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw))
               for key, (argv, kw) in jobs.items()}
    done = {}
    for key, (argv, proc) in started.items():
        stdout, stderr = proc.communicate(timeout=timeout)
        done[key] = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
    return done
