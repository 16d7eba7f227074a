"""Model definitions and checkpoint loading. `hf_config` is pure Python; the rest imports torch."""
