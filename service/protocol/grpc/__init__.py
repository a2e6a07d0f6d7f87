"""The Open Inference Protocol over gRPC: KServe's ``inference.GRPCInferenceService`` with
Triton's model repository RPCs (``grpc_service.proto``, vendored with its source noted; the
``*_pb2*`` modules are generated from it by ``make grpc-stubs``)."""
