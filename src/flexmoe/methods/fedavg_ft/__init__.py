"""FedAvg-FT (FedAvg, then a local fine-tuning): `config` declares it and its settings (torch-free), `method` implements it."""
