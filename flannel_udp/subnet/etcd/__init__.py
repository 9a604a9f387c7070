"""The etcd lease store, in upstream's key schema (upstream pkg/subnet/etcd)."""
