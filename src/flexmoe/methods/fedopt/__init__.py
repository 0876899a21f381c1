"""The server optimisers FedAvgM, FedAdagrad, FedYogi, FedAdam: `config` declares it and its settings (torch-free), `method` implements it."""
