"""Model families as plain PyTorch modules with forward(input_ids, positions-bearing metadata, kv cache)."""
