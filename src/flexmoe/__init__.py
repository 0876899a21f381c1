"""flexmoe: personalized federated fine-tuning of Mixture-of-Experts LLMs."""

from flexmoe.engine.export import load_personalized
from flexmoe.errors import FlexmoeError

__version__ = "0.1.0"
__all__ = ["FlexmoeError", "__version__", "load_personalized"]
