"""Entry point of the ``backend_llamacpp`` plugin."""

from kv3d_core import hookimpl


@hookimpl
def register_backends(register):
    from kv3d_backend_llamacpp.backend import LlamaCppBackend

    register("llamacpp", LlamaCppBackend)
