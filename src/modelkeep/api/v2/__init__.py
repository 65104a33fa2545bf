"""The Open Inference Protocol (KServe V2) over REST: one protocol adapter over the data plane.

- ``codec.py`` (with ``_json.py``, ``_binary.py``): V2 bodies <-> tensors, checked against the
  model's signature before any tensor is built;
- ``infer.py``: the one infer entry, pure ASGI before routing (``authenticate_request``, the
  body limit, ``service.dataplane.infer``, the V2 encoder);
- ``routes.py``: health, server and model metadata, readiness (FastAPI), and the OpenAPI
  description of the infer routes.

Nothing is imported here, so that the codec can be imported without the web stack.
"""
