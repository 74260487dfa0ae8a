"""kv3d's tools, outside the serving core (distribution ``kv3d-tools``), registered as
``kv3d`` commands by :mod:`kv3d_tools.plugin`:

- :mod:`kv3d_tools.bench` -- ``kv3d bench``: kv3d against llama.cpp's llama-server and
  llama-cpp-python's server on a seeded chat workload (Hydra config ``conf/bench.yaml``);
- :mod:`kv3d_tools.quality` -- ``kv3d quality``: how much a delta codec changes what the
  model predicts (prompt set ``data/quality_prompts.json``);
- :mod:`kv3d_tools.synth_model` -- ``kv3d synth-model``: a synthetic GGUF of a named shape.

They use the core (configuration, plugins, contracts, the backend's ``state_layout``) and the
llama.cpp backend plugin (its GGUF reader, ``kv3d_backend_llamacpp.gguf_meta``); the core never
imports them.
"""

__version__ = "0.1.0"
