"""Cost estimation before anything runs: message sizes (`comm`), device memory (`memory`), FLOPs
(`flops`), and the whole plan of a run (`plan`, `flexmoe plan`)."""
