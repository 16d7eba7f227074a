"""The worker runtime both worker kinds share: the gRPC server on a thread of its own next to the engine loop
(`server_thread`), the one way an RPC starts a request on the engine and maps what goes wrong to a status
(`rpc`), and the load and health a worker reports (`health`). `protos/` keeps the protos and their codecs only."""
