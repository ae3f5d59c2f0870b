"""The model on disk: GGUF containers, ggml block formats (quantized weights), quantization."""
