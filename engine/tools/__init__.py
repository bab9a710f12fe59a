"""Tools over the engine: the automatic layer split, the memory plan, the parity check against
transformers, and chat-template rendering."""
