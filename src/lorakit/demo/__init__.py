"""The embedded default of `lorakit train`: LoRA vs full fine-tuning of all-MiniLM-L6-v2 on a task built at
run time from the standard library's docstrings (no download, no data file)."""

from .compare import DemoSettings, run_demo
from .minilm import load_classifier, load_tokenizer, model_dir
from .stdlib_docs import DEFAULT_PACKAGES, DocDataset, build_dataset

__all__ = ["DEFAULT_PACKAGES", "DemoSettings", "DocDataset", "build_dataset", "load_classifier", "load_tokenizer",
           "model_dir", "run_demo"]
