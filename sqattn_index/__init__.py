"""sqattn_index: a LlamaIndex-native KV-cache index implementing Squeezed Attention."""

from .chat_engine import SqueezedChatEngine
from .config import SqueezeConfig
from .errors import *  # noqa: F401,F403
from .index import SqueezedKVIndex, SqueezedKVIndexStruct, load_index
from .llm import SqueezedLLM
from .node_parsing import default_node_parser
from .query_engine import SqueezedQueryEngine
from .retriever import SqueezedKVRetriever
from .vector_store import SqueezedKVStore

__version__ = "0.1.0"
