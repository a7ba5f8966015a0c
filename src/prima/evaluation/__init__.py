"""M4Seg evaluation: metric definitions, phrase similarity, the predictions scorer, reports and `prima eval`.

Importing this package is cheap; torch, transformers, nltk and matplotlib load only when used.
"""

from prima.evaluation.eval_run import run_eval
from prima.evaluation.report import compare_runs
from prima.evaluation.scorer import M4SegEvaluator, read_predictions, score_predictions

__all__ = ["M4SegEvaluator", "compare_runs", "read_predictions", "run_eval", "score_predictions"]
