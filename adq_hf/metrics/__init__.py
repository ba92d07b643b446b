"""Metrics shipped with adq_hf (loadable offline through ``evaluate``)."""

import os


def load_topk_accuracy(**kwargs):
    """``evaluate`` top-1/top-5 accuracy metric, loaded from the file shipped in this package."""
    import evaluate

    return evaluate.load(os.path.join(os.path.dirname(__file__), "topk_accuracy.py"), **kwargs)
