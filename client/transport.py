"""How a connection URI becomes a gRPC channel: plain for ``unix`` and ``tcp``, mutual TLS for
``tls``.

A ``virtmig+tls`` channel presents ``clientcert.pem`` of the PKI dir (the URI's ``?pkipath=``,
else ``default_pki_dir`` when the caller gives one, else ``$VIRTMIG_PKI_DIR``, else the user's
default dir) and trusts the daemons its ``cacert.pem`` signed.  gRPC checks the daemon's
certificate against the host the URI names, as libvirt's client does: a DNS name must match a
DNS SAN, an address an IP SAN.  That check is never switched off here.

The PKI code (:mod:`virtmig.proto.pki`, and with it ``cryptography``) is imported only for a TLS
URI: a CLI command over the unix socket does not pay for it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import grpc

from virtmig.proto.uri import ConnectURI


def with_pki_dir(uri: ConnectURI, default_pki_dir: str | os.PathLike[str] | None) -> ConnectURI:
    """``uri`` with ``default_pki_dir`` as its ``pkipath`` if it is a TLS URI naming none."""
    if uri.transport != "tls" or uri.pki_dir or not default_pki_dir:
        return uri
    return dataclasses.replace(uri, pki_dir=os.fspath(default_pki_dir))


def open_channel(uri: ConnectURI, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
    """A channel to ``uri``; for TLS, with the PKI dir's client credentials, checked first
    (:class:`~virtmig.proto.errors.ConfigUnsupported` naming the file that is wrong)."""
    if uri.transport != "tls":
        return grpc.aio.insecure_channel(uri.grpc_target, options=list(options))
    from virtmig.proto.pki import PkiPaths, load_client_credentials

    tls = load_client_credentials(PkiPaths.resolve(uri.pki_dir or None))
    credentials = grpc.ssl_channel_credentials(root_certificates=tls.ca_pem,
                                               private_key=tls.key_pem,
                                               certificate_chain=tls.cert_chain_pem)
    return grpc.aio.secure_channel(uri.grpc_target, credentials, options=list(options))
