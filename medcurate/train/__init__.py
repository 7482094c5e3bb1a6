"""Training on Ray Train: self-supervised pretraining of encoders on a collection's images."""

from medcurate.train.pretrain import PretrainConfig, pretrain

__all__ = ["PretrainConfig", "pretrain"]
