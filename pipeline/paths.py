"""Every file path the pipeline reads or writes, relative to the workspace root.

The one place that knows where things live; stages and tests ask here and never
spell a path themselves. Paths are relative so a workspace can be copied (tests do).
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path("data/prepared")
SPLITS = ("train", "val", "test")
LABELS_FILE = DATA_DIR / "labels.json"

TOKENIZER_DIR = Path("build/tokenizer")
TRAIN_DIR = Path("build/train")
TRAINED_MODEL_DIR = TRAIN_DIR / "model"  # transformers save_pretrained() layout
MODELS_DIR = Path("models")

METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")

MLFLOW_DIR = Path("mlruns")
HF_CACHE_DIR = Path("build/hf-cache")


def split_file(split: str) -> Path:
    return DATA_DIR / f"{split}.jsonl"


def metrics_file(stage: str) -> Path:
    return METRICS_DIR / f"{stage}.json"


def model_dir(name: str, version: int) -> Path:
    """TF Serving layout: models/<name>/<numeric version>/saved_model.pb."""
    return MODELS_DIR / name / str(version)


# The benchmark stage: raw outputs (per-request CSV, its ledger, server logs) and plots.
BENCHMARK_DIR = Path("build/benchmark")
BENCHMARK_REQUESTS = BENCHMARK_DIR / "requests.csv"
BENCHMARK_LEDGER = BENCHMARK_DIR / "ledger.sqlite3"
BENCHMARK_LOAD_CSV = METRICS_DIR / "benchmark_load.csv"
BENCHMARK_COST_CSV = METRICS_DIR / "benchmark_cost.csv"


def benchmark_plot(name: str) -> Path:
    return PLOTS_DIR / f"benchmark_{name}.png"
