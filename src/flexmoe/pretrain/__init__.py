"""Pretraining, evaluation and model card of the shipped tiny qwen2_moe base (`flexmoe pretrain`)."""

from flexmoe.pretrain.config import PretrainConfig, load_config
from flexmoe.pretrain.packing import train_tokenizer
from flexmoe.pretrain.train import pretrain

__all__ = ["PretrainConfig", "load_config", "pretrain", "train_tokenizer"]
