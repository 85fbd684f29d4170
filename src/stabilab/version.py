"""The code version a result was made with: the git commit of the checkout, and whether its code
(src/, workflow/, Snakefile, pyproject.toml) had uncommitted changes, in which case the commit
alone does not reproduce the result.

Where the code runs without its git folder (a copy on a GPU box), set STABILAB_GIT_COMMIT (and
STABILAB_GIT_DIRTY=1 or 0) to the checkout's values.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CODE = ("src", "workflow", "Snakefile", "pyproject.toml")


@functools.cache
def code_version() -> dict:
    if os.environ.get("STABILAB_GIT_COMMIT"):
        return {"git_commit": os.environ["STABILAB_GIT_COMMIT"],
                "git_dirty": os.environ.get("STABILAB_GIT_DIRTY", "0") not in ("0", "", "false")}

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:  # an installed copy, not a checkout
        return {"git_commit": None, "git_dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no", "--", *CODE)
    return {"git_commit": commit, "git_dirty": bool(status)}
