"""flexmoe as a Flower app: the ServerApp and ClientApp run `flexmoe.engine.core`'s server and
client steps (and so the very same `flexmoe.methods` code) over Flower messages."""
