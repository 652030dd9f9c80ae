"""Backends: the endpoints of each target (from static flags or etcd) and pooled connections."""
