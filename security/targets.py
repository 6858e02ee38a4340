"""The one place that knows what a scan looks at: Dockerfiles, locks, code, skipped folders, image.

Paths are relative to a root, so tests can point the same scan at a temporary tree.
Must not run anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Tuple

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
POLICY_FILE = PACKAGE_DIR / "policy.yaml"
REPORTS_DIR = PACKAGE_DIR / "reports"  # git-ignored

# Folders no scan descends into: virtual environments, pipeline outputs and caches hold
# third-party or generated files (covered by the lock audits and SBOMs, or not ours), and
# scanning them would take minutes. They are top-level only: trivy reads these relative to
# the scanned root, so a nested `tests/data/` is still scanned.
SKIP_DIRS: Tuple[str, ...] = (
    ".git", ".venv", "build", "data", "models", "mlruns", "dvc_plots", ".dvc/cache",
    ".dvc/tmp", ".pytest_cache", ".ruff_cache", "security/reports", "node_modules",
)

DEFAULT_IMAGE = "tokenmeter:latest"


@dataclass(frozen=True)
class Targets:
    """What to scan under `root`. `Targets.for_root(path)` gives the project's layout."""

    root: Path
    dockerfile: Path  # the project layer
    base_dir: Path  # the bases the layer builds on: *.Dockerfile
    host_lock: Path
    image_locks_dir: Path  # one *.lock per base (its Python's packages for the layer)
    pyproject: Path
    python_paths: Tuple[Path, ...]
    image: str = DEFAULT_IMAGE
    skip_dirs: Tuple[str, ...] = field(default=SKIP_DIRS)

    @classmethod
    def for_root(cls, root: Path, image: str = "") -> "Targets":
        root = Path(root).resolve()
        return cls(
            root=root,
            dockerfile=root / "docker" / "Dockerfile",
            base_dir=root / "docker" / "base",
            host_lock=root / "requirements.lock",
            image_locks_dir=root / "docker" / "locks",
            pyproject=root / "pyproject.toml",
            # Our own code; tests are left out on purpose (asserts and fixtures by design).
            python_paths=tuple(root / p for p in ("pipeline", "serving", "security",
                                                  "tasks.py")),
            image=image or os.environ.get("TOKENMETER_IMAGE", "") or DEFAULT_IMAGE,
        )

    def rel(self, path: Path) -> str:
        """`path` relative to the root when it is inside it (for reports), else as given."""
        try:
            return str(Path(path).resolve().relative_to(self.root))
        except ValueError:
            return str(path)

    def dockerfiles(self) -> List[Path]:
        """The Dockerfiles that exist: the project layer first, then each base by name."""
        bases = sorted(self.base_dir.glob("*.Dockerfile")) if self.base_dir.is_dir() else []
        return [p for p in [self.dockerfile, *bases] if p.is_file()]

    def image_locks(self) -> List[Path]:
        """Every image lock that exists (docker/locks/*.lock), by name."""
        if not self.image_locks_dir.is_dir():
            return []
        return sorted(p for p in self.image_locks_dir.glob("*.lock") if p.is_file())

    def image_locks_pattern(self) -> str:
        """The image locks in words, for "does not exist yet": docker/locks/*.lock."""
        return f"{self.rel(self.image_locks_dir)}/*.lock"

    def existing_python_paths(self) -> List[Path]:
        return [p for p in self.python_paths if p.exists()]
