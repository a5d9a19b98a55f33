"""The CSI v1.12.0 wire contract (package ``csi.v1``) as Python modules.

``csi.proto`` is ours; ``csi_pb2.py``, ``csi_pb2.pyi`` and ``csi_pb2_grpc.py`` are
generated from it by ``scripts/gen-proto`` (``make proto``) and must never be edited
by hand: tests/csi/test_proto.py fails when they drift from the proto.
"""
