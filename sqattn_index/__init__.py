"""sqattn_index: a LlamaIndex-native KV-cache index implementing Squeezed Attention."""

from .config import SqueezeConfig
from .errors import *  # noqa: F401,F403

__version__ = "0.1.0"
