"""flexmoe as a Flower app: the ServerApp and ClientApp run `flexmoe.engine.server`'s and
`flexmoe.engine.client`'s steps (and so the very same `flexmoe.methods` code) over Flower messages."""
