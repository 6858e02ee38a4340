"""How a stage fails: user errors are one line on stderr and exit code 2, never a traceback.

`PipelineError` is for things the user can fix (a bad param, a missing package, a file
without the right columns). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn

EXIT_USER_ERROR = 2
EXIT_GATE_FAILED = 1


class PipelineError(Exception):
    """A problem the user can fix; the message says what to fix."""


class GateFailed(Exception):
    """A quality gate in `validate` was not met; the message names the gate."""


def fail(message: str) -> NoReturn:
    raise PipelineError(message)


def require(*files, hint: str = "run `dvc repro` (earlier stages write it)") -> None:
    """Stop with one line if an input another stage writes is missing."""
    from pathlib import Path

    missing = [str(f) for f in files if not Path(f).exists()]
    if missing:
        fail(f"missing {', '.join(missing)}; {hint}")


def run_stage(stage: str, main: Callable[[], None]) -> None:
    """Run a stage's `main`, turning known failures into one line and an exit code."""
    try:
        main()
    except PipelineError as exc:
        print(f"error: {stage}: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except GateFailed as exc:
        print(f"error: {stage}: gate failed: {exc}", file=sys.stderr)
        sys.exit(EXIT_GATE_FAILED)
    except KeyboardInterrupt:
        print(f"error: {stage}: interrupted", file=sys.stderr)
        sys.exit(130)
