"""Top-1 / top-5 accuracy as an ``evaluate`` metric that ships with adq_hf, so it loads offline
(``evaluate.load("accuracy")`` downloads its script from the Hub)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Top-k accuracy: predictions are each sample's class indices ranked by score (best first)."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of lists of int, the top-ranked class indices per sample (at least k).
    references: list of int, the true class per sample.
    k: tuple of int, the k values to report (default (1, 5)).
Returns:
    {"top1": float, "top5": float, ...} in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k=(1, 5)):
        ref = np.asarray(references)
        results = {}
        for kk in k:
            hits = [r in p[:kk] for p, r in zip(predictions, ref)]
            results[f"top{kk}"] = float(np.mean(hits)) if hits else 0.0
        return results
