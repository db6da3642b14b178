"""JSON-RPC 2.0 server, schema-driven dispatch and error mapping."""
