"""tunesmith: fine-tune large language models with LoRA, QLoRA or in full."""

__version__ = "0.1.0"
