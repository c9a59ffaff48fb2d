"""The server's routes, one ``APIRouter`` per group, each taking what it needs (the adapter pool, the
scheduler, the caller's key) from ``serve.context``'s dependencies; ``serve.app.build_app`` includes them.

- ``completions``: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/health``
- ``adapters``: ``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``
- ``aliases``: ``/v1/aliases``
- ``feedback``: ``/v1/feedback``
- ``scores``: ``/v1/score``
"""
