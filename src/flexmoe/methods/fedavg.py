"""FedAvg (McMahan et al. 2017): clients send their trained weights; the server averages
them, weighted by training examples (or uniformly, `server.weighting`)."""

from flexmoe.methods.base import Method


class FedAvg(Method):
    name = "fedavg"
