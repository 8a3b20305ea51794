"""Evaluation suite: TruthfulQA MC, BoolQ, LogiQA, TyDiQA GoldP, ASDiv on local files or HF datasets.

One module per benchmark (load / requests / score / aggregate), shared metrics, the scoring
engine (prefix-reusing log-likelihoods, greedy generation) and the runner.  The Ray glue and
``run_eval`` live in forgetting_ray/stages/evaluate.py.
"""

from .base import EvalDataError, UnknownTaskError, select_indices
from .runner import HEADLINE, TASKS, format_table, get_task

__all__ = ["EvalDataError", "UnknownTaskError", "select_indices", "HEADLINE", "TASKS", "format_table", "get_task"]
