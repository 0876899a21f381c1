"""Pretraining, evaluation and model card of the shipped tiny qwen2_moe base (`flexmoe pretrain`)."""

from flexmoe.pretrain.train import PretrainConfig, load_config, pretrain, train_tokenizer

__all__ = ["PretrainConfig", "load_config", "pretrain", "train_tokenizer"]
