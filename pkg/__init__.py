"""virtmig: libvirt-compatible live-migration daemons and client over gRPC."""

__version__ = "0.1.0"
