"""Loading base models: local directories or Hugging Face model IDs (hub.py), the checkpoint's own dtype or
NF4 read straight from safetensors (load.py, stream.py), and the small facts about tasks and dtypes (options.py).
"""

from .hub import hub_cache_dir, parse_model_id, resolve_model
from .load import load_model, load_tokenizer

__all__ = ["hub_cache_dir", "load_model", "load_tokenizer", "parse_model_id", "resolve_model"]
