"""The compiled data plane: route table (routes), packet checks and rewrites (packet), the TUN<->UDP pump (pump)."""
