"""The Open Inference Protocol (KServe V2) over gRPC: a codec and a servicer over the data plane.

``grpc_predict_v2.proto`` is KServe's; the ``*_pb2*`` modules are generated from it by
``scripts/grpc_codegen.py`` and never edited. ``_codec.py`` turns messages into tensors checked
against the signature and results into messages; ``_servicer.py`` answers the RPCs (each one
authenticated and authorized like its REST twin); ``server.py`` runs the TLS listener next to
uvicorn in every worker.
"""
