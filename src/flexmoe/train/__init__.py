"""The local training loop shared by every method and engine."""

from flexmoe.train.loop import TrainResult, cosine_lr, local_train, response_loss

__all__ = ["TrainResult", "cosine_lr", "local_train", "response_loss"]
