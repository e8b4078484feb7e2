"""Inference: decoding with a KV cache, the completion engine, the HTTP server, interactive sampling."""
