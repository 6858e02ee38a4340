"""Model versions in one endpoint: which versions of the model are loaded, and which one answers
a request -- the version its `Tokenmeter-Model-Version` header pins, else the rollout's canary
for `canary_percent` of requests and the stable version for the rest.

The rollout (stable, canary and its share, the version before the last promotion) is a row in
the ledger's database, so every replica follows the same one: `python -m serving models canary
| promote | rollback` writes it, and each process re-reads it every `refresh_s` and applies it
without a restart. A version the rollout names is loaded (in a thread) before the new rollout
is applied; until then, and whenever a version cannot be loaded, the process keeps answering
with the rollout it has. Versions once loaded stay loaded, so a rollback is instant.

The rules for changing a rollout (`canary`, `promote`, `rollback`) and the validate gate are
pure functions here; this module knows no HTTP and no money, and does not load TF itself (its
`load` callable does).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from anyio import to_thread

from serving.errors import first_line
from serving.metering import Meter
from serving.model_dir import read_card
from serving.runner import ModelInfo

log = logging.getLogger("tokenmeter")

VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$")


@dataclass
class Served:
    """One loaded version: its runner (model and micro-batcher) and its meter (tokenizer)."""

    runner: Any  # serving.runner.ModelRunner, or a test's stand-in with .info/.submit/.depth
    meter: Meter

    @property
    def info(self) -> ModelInfo:
        return self.runner.info

    @property
    def version(self) -> str:
        return str(self.runner.info.version)


@dataclass(frozen=True)
class Rollout:
    """Which version answers unpinned requests. `canary` gets `canary_percent` of them (0: only
    pinned requests); `previous` is the stable version before the last promotion (what
    `rollback` returns to)."""

    stable: str
    canary: Optional[str] = None
    canary_percent: int = 0
    previous: Optional[str] = None

    def versions(self) -> List[str]:
        return [self.stable] + ([self.canary] if self.canary else [])

    def share(self, version: str) -> int:
        """The percent of unpinned requests `version` gets."""
        if version == self.stable:
            return 100 - self.canary_percent if self.canary else 100
        return self.canary_percent if version == self.canary else 0

    def describe(self) -> str:
        text = f"stable {self.stable}"
        if self.canary:
            text += f", canary {self.canary} at {self.canary_percent}%"
        return text + (f" (previous stable {self.previous})" if self.previous else "")


def stored_rollout(ledger: Any, model: str) -> Optional[Rollout]:
    """The rollout of `model` in the ledger (serving.ledger.Ledger.rollout); None: never set."""
    row = ledger.rollout(model)
    return Rollout(*row) if row is not None else None


class RolloutError(ValueError):
    """A rollout change that is not allowed; the message is one line saying why."""


class UnknownVersion(LookupError):
    """A pinned version this process does not serve; `served` lists the ones it does."""

    def __init__(self, version: str, served: List[str]):
        super().__init__(version)
        self.version, self.served = version, served


# --- the rules of a rollout change --------------------------------------------------------------
def start_canary(r: Rollout, version: str, percent: int) -> Rollout:
    if not 0 <= percent <= 100:
        raise RolloutError(f"--percent {percent}: give 0 to 100")
    if version == r.stable:
        raise RolloutError(f"version {version} is already the stable version")
    return replace(r, canary=version, canary_percent=percent)


def promote(r: Rollout, version: Optional[str] = None) -> Rollout:
    """The canary (or `version`) becomes stable and takes all unpinned traffic."""
    target = version or r.canary
    if target is None:
        raise RolloutError("there is no canary to promote; name a version")
    if target == r.stable:
        raise RolloutError(f"version {target} is already the stable version")
    return Rollout(stable=target, previous=r.stable)


def rollback(r: Rollout) -> Rollout:
    """Withdraw the canary; without one, return to the stable version before the last
    promotion. Nothing to roll back to is an error."""
    if r.canary is not None:
        return replace(r, canary=None, canary_percent=0)
    if r.previous is None:
        raise RolloutError(f"nothing to roll back: no canary, and no version was stable "
                           f"before {r.stable}")
    return Rollout(stable=r.previous)


# --- the validate gate --------------------------------------------------------------------------
@dataclass(frozen=True)
class Gate:
    passed: bool
    detail: str  # what failed, or what passed, in one line


def gate_from_report(report: Dict[str, Any], model: str, version: str) -> Optional[Gate]:
    """The validate stage's verdict on `model`/`version` from its report (metrics/validate.json:
    `model_dir`, `passed`, `gates`); None when the report is about another version."""
    model_dir = Path(str(report.get("model_dir", "")))
    if (model_dir.parent.name, model_dir.name) != (model, version):
        return None
    gates = report.get("gates") or {}
    failed = sorted(name for name, g in gates.items() if not g.get("passed"))
    passed = bool(report.get("passed")) and not failed
    if passed:
        return Gate(True, "validate passed: " + ", ".join(sorted(gates)))
    return Gate(False, "validate failed: " + (", ".join(failed) or "passed is false"))


def check_version_dir(root: Path, model: str, version: str) -> Path:
    """The directory of `version` under the model's root, its card naming this model and
    version, or RolloutError."""
    if not VERSION_RE.match(version):
        raise RolloutError(f"{version!r} is not a version (a directory name such as 2)")
    path = Path(root) / version
    if not path.is_dir():
        raise RolloutError(f"no version {version} of {model}: {path} does not exist (export it: "
                           f"export.version in params.yaml, then dvc repro)")
    try:
        card = read_card(path)
        named = (str(card["name"]), str(card["version"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RolloutError(f"{path}: cannot read its model card ({first_line(exc)}); "
                           f"re-run export") from None
    if named != (model, version):
        raise RolloutError(f"{path} holds {named[0]}/{named[1]} according to its model card, "
                           f"not {model}/{version}")
    return path


# --- the versions one process serves ------------------------------------------------------------
class Versions:
    """The loaded versions of one model and the rollout that routes between them."""

    def __init__(self, default: Served, load: Optional[Callable[[str], Served]] = None,
                 read_rollout: Optional[Callable[[], Optional[Rollout]]] = None,
                 refresh_s: float = 5.0, draw: Callable[[], float] = random.random,
                 on_change: Optional[Callable[["Versions"], None]] = None):
        self.default = default
        self.served: Dict[str, Served] = {default.version: default}
        self.rollout = Rollout(stable=default.version)
        self._load, self._read, self.refresh_s = load, read_rollout, refresh_s
        self._draw, self._on_change = draw, on_change
        self._follower: Optional["asyncio.Task[None]"] = None
        self._failed: Dict[str, str] = {}  # version -> why it could not be loaded (logged once)

    @property
    def model(self) -> str:
        return self.default.info.name

    def all(self) -> List[Served]:
        return list(self.served.values())

    def pick(self, pinned: Optional[str] = None) -> Served:
        """The version that answers this request."""
        if pinned is not None:
            served = self.served.get(pinned)
            if served is None:
                raise UnknownVersion(pinned, sorted(self.served))
            return served
        r = self.rollout
        if r.canary is not None and self._draw() * 100 < r.canary_percent:
            return self.served[r.canary]
        return self.served[r.stable]

    async def follow(self) -> None:
        """Apply the stored rollout now (a new replica answers with the rollout's versions from
        its first request), then follow it every refresh_s on the event loop, until close()."""
        if self._read is None:
            return
        await self.refresh()
        self._follower = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception:  # a bug must not stop the following: logged, tried again
                log.exception("rollout refresh failed")

    async def refresh(self) -> None:
        """Read the rollout; load the versions it names that are not loaded yet; apply it."""
        assert self._read is not None
        try:
            wanted = await to_thread.run_sync(self._read)
        except Exception as exc:  # the database is away: keep routing as before
            log.warning("rollout not read, routing unchanged: %s", first_line(exc))
            return
        if wanted is None:
            wanted = Rollout(stable=self.default.version)
        if wanted == self.rollout:
            return
        for version in wanted.versions():
            if version not in self.served and not await self._load_version(version):
                return  # keep the rollout we have; logged once per version
        log.info("rollout of %s: %s (was: %s)", self.model, wanted.describe(),
                 self.rollout.describe())
        self.rollout = wanted
        if self._on_change is not None:
            self._on_change(self)

    async def _load_version(self, version: str) -> bool:
        if self._load is None:
            return False
        try:
            # A thread: loading and warming a SavedModel takes seconds; the loop keeps serving.
            self.served[version] = await to_thread.run_sync(self._load, version)
        except Exception as exc:
            why = first_line(exc)
            if self._failed.get(version) != why:
                log.error("version %s of %s cannot be loaded, rollout not applied: %s",
                          version, self.model, why)
                self._failed[version] = why
            return False
        self._failed.pop(version, None)
        log.info("loaded version %s of %s", version, self.model)
        return True

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
        for served in self.served.values():
            stop = getattr(served.runner, "stop", None)
            if stop is not None:
                stop()
