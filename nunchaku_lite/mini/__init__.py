"""The embedded mini model: synthetic shapes data (data), attribute checker (checker), tokenizer training
(tokenizer), training script (train), diffusers-layout export (export), prompt-adherence benchmark (eval),
quantization table (quant_table) and image grids (grid). The trained model lives in nunchaku_lite/assets/mini.
Nothing here is imported by the engine itself."""
