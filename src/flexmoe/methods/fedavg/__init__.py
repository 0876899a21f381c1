"""FedAvg: `config` declares it and its settings (torch-free), `method` implements it."""
