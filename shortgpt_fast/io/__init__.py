"""Reading checkpoint files: the one safetensors header/index/dtype reader (shortgpt_fast.io.safetensors)."""
