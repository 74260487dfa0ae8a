"""Developer tools shipped with kv3d, outside the serving core: the synthetic GGUF writer
(``kv3d synth-model``) and the codec quality harness (``kv3d quality``)."""
