"""flexmoe: personalized federated fine-tuning of Mixture-of-Experts LLMs."""

from flexmoe.errors import FlexmoeError

__version__ = "0.1.0"
__all__ = ["FlexmoeError", "__version__"]
