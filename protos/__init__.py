"""kvrelay's .proto sources and their generated Python stubs (regenerate with `make protos`; never hand-edit).

Only the one conversion module per process boundary imports the `*_pb2` modules."""
