"""Transferability scoring: which model of a zoo will fine-tune best on a target, estimated from
a forward pass (and one backward pass) on a small probe of the target, without fine-tuning.

- :mod:`medcurate.transfer.metrics`: the baselines as numpy functions of (features or source
  predictions, labels): LogME, LEEP, NLEEP, NCE, H-score (plain and shrinkage), SFDA, PARC,
  NCTI, GBC, TransRate.
- :mod:`medcurate.transfer.paper`: LP and FU of Juodelyte et al. and their zoo score.
- :mod:`medcurate.transfer.zoo`: the zoo YAML file, and a model's own source-task head.
- :mod:`medcurate.transfer.evaluate`: weighted Kendall tau against fine-tuned AUCs, rank
  tables, agreement between metrics; reproduces the paper's published evaluation.
- :mod:`medcurate.transfer.registry`: the metrics ``medcurate score`` computes, their variants
  and defaults; :mod:`medcurate.transfer.probe`: the probe it measures on, published as a
  collection; :mod:`medcurate.transfer.tasks`: its per-model work, one Ray task per model.
- :mod:`medcurate.transfer.score`: the ``medcurate score`` command (imports torch and Ray;
  ``metrics``, ``zoo`` and ``evaluate`` need only numpy, scipy and scikit-learn).
"""
