"""KV compression layer: llama.cpp sequence-state reader/writer and delta codecs."""
