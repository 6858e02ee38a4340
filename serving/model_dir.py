"""The contract of an exported model directory, models/<name>/<version>/.

File names and signature names that the pipeline's `export` writes (it imports them from
here) and `validate` and the serving runner read. Pure constants and two readers; imports
neither TF nor transformers, nor anything of the pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

SIGNATURE = "serving_default"
INPUT_NAMES = ("input_ids", "attention_mask")
INPUT_DTYPE = "int32"
OUTPUT_NAME = "probabilities"

TOKENIZER_FILE = "tokenizer.json"
CARD_FILE = "model_card.json"
LABELS_FILE = "labels.json"
PARITY_FILE = "parity_batch.npz"


def read_labels(model_dir: Path) -> Dict[int, str]:
    return {int(k): v for k, v in read_json(Path(model_dir) / LABELS_FILE).items()}


def read_card(model_dir: Path) -> dict:
    return read_json(Path(model_dir) / CARD_FILE)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
