"""Persistent storage of sqattn_index (installed as ``sqattn_index.storage``)."""
