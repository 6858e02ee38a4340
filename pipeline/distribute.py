"""Multi-worker training: reading TF_CONFIG, choosing the strategy, sharding each batch.

`TF_CONFIG` unset (or empty, or naming a cluster of one) is single-worker training: no
strategy at all, exactly the path `train` always took. A cluster of two or more workers
(`worker` jobs, optionally one `chief`) trains under `tf.distribute.MultiWorkerMirroredStrategy`:
every worker builds the same global batches (same data, same seeded shuffle) and keeps its
share of the rows, so the global batch size stays `train.batch_size` and a step sees the
same rows as in a single-worker run (the step's loss is the mean of the workers' means, so a
batch with an odd number of rows weights them slightly unequally; a worker may get none of a
one-row batch). The chief (the `chief` task, else worker 0) writes the
stage's outputs; the others write theirs to a temporary folder and delete it.

A TF_CONFIG that cannot be used is one `PipelineError` line naming TF_CONFIG and what to fix.
Imports TensorFlow only in `make_strategy`.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Mapping, NoReturn, Optional

from pipeline.errors import fail
from serving.errors import first_line

ENV = "TF_CONFIG"
JOBS = ("chief", "worker")  # MultiWorkerMirroredStrategy takes no ps/evaluator jobs
EXAMPLE = ('{"cluster": {"worker": ["host1:port", "host2:port"]}, '
           '"task": {"type": "worker", "index": 0}}')


@dataclass(frozen=True)
class Role:
    """This process's place in the cluster; the default is the single-worker run."""

    num_workers: int = 1
    task_type: str = "worker"
    task_index: int = 0
    has_chief: bool = False

    @property
    def distributed(self) -> bool:
        return self.num_workers > 1

    @property
    def is_chief(self) -> bool:
        """The one task that writes the stage's outputs and the MLflow run."""
        if self.has_chief:
            return self.task_type == "chief"
        return self.task_type == "worker" and self.task_index == 0

    def describe(self) -> str:
        return (f"{self.task_type} {self.task_index} of {self.num_workers} workers"
                f"{' (chief)' if self.is_chief else ''}")


SINGLE = Role()  # TF_CONFIG unset: one worker, no strategy


def _bad(what: str) -> NoReturn:
    fail(f"{ENV}: {what}; set it like {EXAMPLE} (one entry per worker, the same cluster "
         f"on every worker, each its own task), or unset it for single-worker training")


def _address_ok(address: Any) -> bool:
    if not isinstance(address, str):
        return False
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def parse(raw: Optional[str]) -> Role:
    """The role TF_CONFIG's text gives this process (`Role()` when it is unset or empty)."""
    if raw is None or not raw.strip():
        return SINGLE
    try:
        config = json.loads(raw)
    except ValueError as exc:
        _bad(f"is not JSON ({first_line(exc)})")
    if not isinstance(config, dict):
        _bad("is not a JSON object")
    cluster = config.get("cluster")
    if not isinstance(cluster, dict) or not cluster:
        _bad("has no \"cluster\" (an object of job name -> list of \"host:port\")")
    other = sorted(set(cluster) - set(JOBS))
    if other:
        _bad(f"cluster has job(s) {', '.join(map(repr, other))}; multi-worker training takes "
             f"only 'worker' (and at most one 'chief')")
    seen = set()
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not addresses:
            _bad(f"cluster.{job} is not a non-empty list of \"host:port\"")
        for address in addresses:
            if not _address_ok(address):
                _bad(f"cluster.{job} has {address!r}, not \"host:port\"")
            if address in seen:
                _bad(f"address {address} appears twice in the cluster")
            seen.add(address)
    if len(cluster.get("chief", [])) > 1:
        _bad(f"cluster.chief has {len(cluster['chief'])} addresses; a cluster has at most one")
    task = config.get("task")
    if not isinstance(task, dict):
        _bad("has no \"task\" (this worker's {\"type\": \"worker\", \"index\": N})")
    task_type, index = task.get("type"), task.get("index")
    if task_type not in cluster:
        _bad(f"task.type is {task_type!r}, not a job of the cluster "
             f"({', '.join(map(repr, cluster))})")
    if not isinstance(index, int) or isinstance(index, bool):
        _bad(f"task.index is {index!r}, not an integer")
    count = len(cluster[task_type])
    if not 0 <= index < count:
        _bad(f"task.index {index} is out of range: cluster.{task_type} has {count} "
             f"address(es), so the index is 0..{count - 1}")
    return Role(num_workers=sum(len(a) for a in cluster.values()), task_type=str(task_type),
                task_index=index, has_chief="chief" in cluster)


def role_from_env(env: Optional[Mapping[str, str]] = None) -> Role:
    return parse((os.environ if env is None else env).get(ENV))


def make_strategy(role: Role) -> Optional[Any]:
    """MultiWorkerMirroredStrategy (reading TF_CONFIG) for a cluster; None for one worker,
    i.e. TensorFlow's default strategy, as before. Call it before any other TF op runs."""
    if not role.distributed:
        return None
    import tensorflow as tf

    # AUTO: ring all-reduce on CPU, NCCL where there are GPUs.
    return tf.distribute.MultiWorkerMirroredStrategy()


def scope(strategy: Optional[Any]) -> ContextManager[Any]:
    """The strategy's scope (variables made in it are mirrored); nothing without one."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def dataset(strategy: Optional[Any], make: Callable[[int, int], Any]) -> Any:
    """`make(0, 1)` without a strategy; with one, a distributed dataset in which each worker
    runs `make(its index, number of workers)` and so yields its own share of every batch."""
    if strategy is None:
        return make(0, 1)
    return strategy.distribute_datasets_from_function(
        lambda ctx: make(ctx.input_pipeline_id, ctx.num_input_pipelines))
