"""The one typed settings object of the endpoint, read from TOKENMETER_* environment variables.

Validated at start-up (bad values stop the process with one line); it must not read files
or open connections -- the modules that own those do.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Optional

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PRICING = Path(__file__).resolve().parent / "pricing.yaml"


class Settings(BaseSettings):
    # protected_namespaces=(): `model_dir` is our field, not pydantic's (older 2.x warn on it).
    model_config = SettingsConfigDict(env_prefix="TOKENMETER_", extra="ignore",
                                      protected_namespaces=())

    model_dir: Path = Path("models/sentiment/1")
    # A filesystem path means SQLite; postgresql://... means PostgreSQL.
    ledger: str = "ledger.sqlite3"
    pricing_file: Path = DEFAULT_PRICING
    # Loopback by default: exposing the endpoint is a deliberate act (a proxy, or --host).
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    max_texts: int = Field(32, ge=1, le=1024)
    max_body_bytes: int = Field(256 * 1024, ge=1024)
    max_idempotency_key_len: int = Field(200, ge=8)

    # Micro-batching.
    max_batch: int = Field(32, ge=1)
    max_wait_ms: float = Field(2.0, ge=0)
    queue_size: int = Field(1024, ge=1)
    execution: str = "graph"  # graph | eager | xla
    warmup: bool = True

    # Ledger group commit: wait this long for more events to share one commit. 0 (default):
    # no added wait; the events that queued while the previous commit was fsyncing share the
    # next one, so groups still form under load (a 1 ms wait cost +30% p50 at concurrency 1).
    commit_wait_ms: float = Field(0.0, ge=0)
    commit_max_batch: int = Field(256, ge=1)
    # Billing rows waiting for the writer before requests get 503 ledger_busy (backpressure).
    ledger_queue_size: int = Field(10_000, ge=1)
    # PostgreSQL only: no statement (and no row-lock wait) of the ledger takes longer.
    pg_statement_timeout_ms: int = Field(10_000, ge=1)
    pg_lock_timeout_ms: int = Field(5_000, ge=1)
    # SQLite only: how long a write waits for a lock held by another process (the keys CLI,
    # a backup) before the group fails and its requests get 503 ledger_unavailable, unbilled.
    sqlite_busy_timeout_ms: int = Field(5_000, ge=0)
    # PostgreSQL only: connections for reads (keys, spend, usage) shared by the request threads.
    pg_pool_size: int = Field(8, ge=1)
    # The longest a request waits for its billing row. A COMMIT whose outcome is unknown (the
    # connection broke as it was sent) is looked up for 80% of it while the database comes back;
    # past it the answer is 503 ledger_outcome_unknown (an Idempotency-Key retry tells).
    billing_deadline_s: float = Field(30.0, gt=0)
    # An Idempotency-Key is remembered this long (Stripe: 24 h); after it, the key is free.
    idempotency_retention_s: float = Field(86_400.0, gt=0)

    # How long a key record and a month-to-date spend figure are reused without asking the
    # ledger (0: always ask). A key revoked in the database is refused at most this late.
    key_cache_s: float = Field(5.0, ge=0)

    # How often each process re-reads the model rollout (stable/canary versions) from the
    # ledger (serving.versions): a promote or rollback reaches every replica within this.
    rollout_refresh_s: float = Field(5.0, gt=0)

    # Defaults for keys created without their own limits (0 = unlimited).
    default_rpm: int = Field(0, ge=0)
    default_tpm: int = Field(0, ge=0)
    # RPM/TPM shared by every replica (serving.shared_limits): a redis:// URL; unset, see
    # limit_store below. LIMIT_REPLICAS: how many replicas share the limits; while
    # Redis does not answer, each limits at 1/LIMIT_REPLICAS of every limit.
    redis_url: Optional[str] = None
    limit_replicas: int = Field(1, ge=1)
    # Where the limits every replica shares live: auto | memory | redis | postgres. auto:
    # Redis if REDIS_URL is set, else PostgreSQL (serving.pg_limits, in the ledger's database)
    # when the ledger is a postgresql:// DSN, else memory (each process its own). Resolved
    # here, so the field never reads "auto" once loaded. Declared after ledger and redis_url
    # so the check below can see them.
    limit_store: str = "auto"

    # Benchmarking only (the metering-overhead figure): "off" answers without key, limits,
    # budgets or ledger, so nothing is billed. Refused unless ALLOW_UNMETERED is also set,
    # and never the default. Declared in this order so the check below can see both.
    allow_unmetered: bool = False
    metering: str = "on"

    # What the machine costs per hour (USD), exported for the cost dashboard's unit cost per
    # 1K tokens; the default is a 2-vCPU on-demand instance (params.yaml's benchmark hardware).
    hardware_usd_per_hour: Decimal = Field(Decimal("0.085"), ge=0)

    log_level: str = "info"
    instance_id: Optional[str] = None

    @field_validator("execution")
    @classmethod
    def _execution(cls, v: str) -> str:
        if v not in ("graph", "eager", "xla"):
            raise ValueError("must be one of graph, eager, xla")
        return v

    @field_validator("metering")
    @classmethod
    def _metering(cls, v: str, info: ValidationInfo) -> str:
        if v not in ("on", "off"):
            raise ValueError("must be on or off")
        if v == "off" and not info.data.get("allow_unmetered"):
            raise ValueError("off serves unbilled answers; it is for benchmarks only and "
                             "needs TOKENMETER_ALLOW_UNMETERED=1 as well")
        return v

    @field_validator("ledger")
    @classmethod
    def _ledger(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a SQLite file path or a postgresql:// DSN")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: Optional[str]) -> Optional[str]:
        # Refused here, at start-up, not by the first request's connection attempt.
        if v and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL, e.g. "
                             "redis://127.0.0.1:6379/0")
        return v or None

    @field_validator("limit_store")
    @classmethod
    def _limit_store(cls, v: str, info: ValidationInfo) -> str:
        redis_url = info.data.get("redis_url")
        on_pg = str(info.data.get("ledger", "")).startswith(("postgresql://", "postgres://"))
        if v == "auto":
            return "redis" if redis_url else "postgres" if on_pg else "memory"
        if v not in ("memory", "redis", "postgres"):
            raise ValueError("must be one of auto, memory, redis, postgres")
        if v == "redis" and not redis_url:
            raise ValueError("redis needs TOKENMETER_REDIS_URL")
        if v == "postgres" and not on_pg:
            raise ValueError("postgres needs a PostgreSQL ledger (TOKENMETER_LEDGER="
                             "postgresql://...)")
        return v


def load_settings(**overrides) -> Settings:
    """Settings from the environment, with explicit overrides (CLI flags) on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
