"""Merge coefficients learned by gradients or found by search.

* :func:`task_vectors`, :func:`init_coefficients`, :func:`combine`: merges as differentiable
  functions of per-model or per-tensor coefficients (TIES masks fixed).
* :func:`adamerging`: coefficients that minimise the merged model's prediction entropy on
  unlabeled inputs (AdaMerging, AdaMerging++).
* :func:`dam`: per-feature coefficients of each model, distilled from the experts (DAM).
* :func:`search`: any method's hyperparameters by grid, random or CMA-ES search, each
  population vmapped; :func:`lcsc`: coefficients of a run's saved checkpoints.
* :func:`quadratic_surrogates`, :func:`pareto_front`: MAP's Pareto front of coefficients
  across tasks from a quadratic model of each task's loss.
"""

from jaxmerge.coefficients.adamerging import AdaMergingResult, adamerging, prediction_entropy
from jaxmerge.coefficients.dam import DamResult, dam, dam_coefficients, dam_merge, dam_regularizer, distillation_kl
from jaxmerge.coefficients.linear import TaskVectors, as_weights, combine, init_coefficients, task_vectors
from jaxmerge.coefficients.pareto import Quadratic, fit_quadratic, pareto_front, plot_pareto_front, quadratic_surrogates
from jaxmerge.coefficients.search import SearchResult, lcsc, search

__all__ = ["AdaMergingResult", "DamResult", "Quadratic", "SearchResult", "TaskVectors", "adamerging", "as_weights",
           "combine", "dam",
           "dam_coefficients", "dam_merge", "dam_regularizer", "distillation_kl", "fit_quadratic", "init_coefficients", "lcsc", "pareto_front", "plot_pareto_front", "prediction_entropy",
           "quadratic_surrogates", "search", "task_vectors"]
