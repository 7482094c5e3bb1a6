"""Training on Ray Train, and the studies that train: four commands and what they share.

``pretrain`` (MAE self-supervised pretraining of an encoder on a collection's images),
``finetune`` (an encoder + linear head on a selection or collection; its ``fit_classifier``
and ``fit_head`` are the training runs the two studies repeat), ``audit`` (the shortcut
audit: a confounder in a share of the positives, i.i.d. vs o.o.d. AUC) and ``compare``
(selection strategies trained at equal budgets and seeds). ``ray_fit`` is the Ray Train setup
that finetune and pretrain share; ``evaluation`` the metrics, folds, intervals, permutation
tests and duplicate checks (numpy, no torch). The package re-exports ``pretrain`` and its
config (tests and bench scripts import them from here).
"""

from medcurate.train.pretrain import PretrainConfig, pretrain

__all__ = ["PretrainConfig", "pretrain"]
