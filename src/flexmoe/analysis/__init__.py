"""Statistics over finished runs: paired differences with bootstrap CIs and McNemar tests
(`stats`), on the per-example files runs keep (`paired`)."""
