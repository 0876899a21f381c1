"""Local training only (no federation): `config` declares it and its settings (torch-free), `method` implements it."""
