"""csm: the Conversational Speech Model (Sesame CSM) in plain PyTorch."""

from .config import CSMConfig, TransformerConfig, get_config
from .frames import Segment
from .generate import Generator, Speech, load_generator
from .model import CSM

__all__ = ["CSM", "CSMConfig", "TransformerConfig", "get_config", "Segment", "Generator", "Speech", "load_generator"]
__version__ = "0.1.0"
