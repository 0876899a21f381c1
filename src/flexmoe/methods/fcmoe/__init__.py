"""FC-MoE and FLEx + FC-MoE: `config` declares it and its settings (torch-free), `method` implements it."""
