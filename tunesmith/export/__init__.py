"""`tunesmith export`: merge adapters into their base in bounded memory and write a complete model directory.

sources.py finds the model, adapters and tokenizer; adapter.py reads LoRA adapters and merges them into one weight;
safetensors_io.py reads shard headers and streams tensors into new shards; merge.py runs the merge shard by shard;
hf_files.py writes config.json, generation_config.json and the tokenizer; gguf_export.py writes GGUF files;
modelfile.py the Ollama Modelfile; pipeline.py checks everything first, then writes to a temporary directory and
renames it; command.py is the CLI.
"""
