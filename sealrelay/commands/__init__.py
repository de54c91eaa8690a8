"""The `sealrelay` commands, one module per command or group, each imported only when it runs."""
