"""Prints the headline numbers of the last run from metrics/*.json, as a short table.

Read-only: it never computes a metric, it only shows what the stages wrote.
"""

from __future__ import annotations

from pipeline import paths
from pipeline.io import read_json


def rows() -> list:
    prep = read_json(paths.metrics_file("prepare"))
    tok = read_json(paths.metrics_file("tokenizer"))
    base = read_json(paths.metrics_file("baseline"))
    train = read_json(paths.metrics_file("train"))
    val = read_json(paths.metrics_file("validate"))
    s = prep["splits"]
    return [
        ("texts train/val/test", f"{s['train']['count']}/{s['val']['count']}/{s['test']['count']}"),
        ("vocabulary, [UNK] rate (test)",
         f"{tok['vocab_size']}, {tok['splits']['test']['unk_rate']:.3%}"),
        ("model", f"{train['parameters']:,} parameters, best epoch "
                  f"{train['best_epoch']}/{train['epochs']}"),
        ("test accuracy / macro-F1",
         f"{val['test']['accuracy']:.4f} / {val['test']['macro_f1']:.4f}"),
        ("baseline accuracy / macro-F1",
         f"{base['test']['accuracy']:.4f} / {base['test']['macro_f1']:.4f}"),
        ("model - baseline (accuracy)", f"{val['accuracy_vs_baseline']:+.4f}"),
        ("SavedModel vs Keras max |diff|", f"{val['parity_max_abs_diff']:.2e}"),
        ("single-request latency p50/p95",
         f"{val['latency']['p50_ms']:.1f} / {val['latency']['p95_ms']:.1f} ms"),
        ("gates", "passed" if val["passed"] else "FAILED"),
    ]


def main() -> None:
    table = rows()
    width = max(len(k) for k, _ in table)
    for key, value in table:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
