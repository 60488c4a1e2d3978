"""libvirt's MigrateGetCompressionCache / MigrateSetCompressionCache (virsh ``migrate-compcache``):
the xbzrle cache of a running domain, which its next migrations use, on both backends.

The ``qemu`` backend keeps it in QEMU (``xbzrle-cache-size``, read back for Get); a migration's
``compression.xbzrle.cache`` overrides it.  The ``test`` backend has no compression, and says so
as libvirt's drivers without the API do.
"""

from __future__ import annotations

import asyncio
import sys

import pytest

from tests.daemon.test_jobs import guest, guest_xml, on_qemu
from virtmig.client.migrate import migrate3
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto.errors import InvalidArgument, NoDomain, NoSupport, OperationInvalid
from virtmig.proto.flags import MigrateFlags
from virtmig.proto.params import MigrateParam, TypedParams
from virtmig.testing import Host
from virtmig.testing.pki import session_pki

F = MigrateFlags
P = MigrateParam
MIB = 1 << 20
QEMU_DEFAULT_CACHE = 64 * MIB  # QEMU 7.2's xbzrle-cache-size until set


async def test_compression_cache_on_each_backend(backend_pair: tuple[Host, Host]) -> None:
    src, _dst = backend_pair
    await guest(src)
    with pytest.raises(NoDomain):
        await src.conn.get_compression_cache("nosuch")
    if not on_qemu(src):
        with pytest.raises(NoSupport, match=r"not supported by the connection driver: "
                                            r"virDomainMigrateGetCompressionCache$"):
            await src.conn.get_compression_cache("vm1")
        with pytest.raises(NoSupport, match=r"virDomainMigrateSetCompressionCache$"):
            await src.conn.set_compression_cache("vm1", 8 * MIB)
        return
    assert await src.conn.get_compression_cache("vm1") == QEMU_DEFAULT_CACHE
    await src.conn.set_compression_cache("vm1", 8 * MIB)
    assert await src.conn.get_compression_cache("vm1") == 8 * MIB
    qemu_params = await src.daemon.backend.query(  # type: ignore[attr-defined]
        (await src.conn.lookup("vm1")).uuid, "query-migrate-parameters")
    assert qemu_params["xbzrle-cache-size"] == 8 * MIB
    # Bad sizes are refused (by the client, and by the daemon before QEMU sees them), and
    # change nothing; so are flags, none being defined.
    ref = await src.conn.ref("vm1")
    for bad in (4095, 3 * MIB, 2**64 - 1):
        with pytest.raises(InvalidArgument, match=r"'compression\.xbzrle\.cache' must be"):
            await src.conn.set_compression_cache("vm1", bad)
        with pytest.raises(InvalidArgument, match=r"'compression\.xbzrle\.cache' must be"):
            await src.conn._call(src.conn.migration_stub.SetCompressionCache,
                                 pb.CompressionCacheRequest(domain=ref, cache_size=bad))
    with pytest.raises(InvalidArgument, match=r"unsupported flags \(0x1\) in function "
                                              r"virDomainMigrateSetCompressionCache"):
        await src.conn._call(src.conn.migration_stub.SetCompressionCache,
                             pb.CompressionCacheRequest(domain=ref, cache_size=MIB, flags=1))
    assert await src.conn.get_compression_cache("vm1") == 8 * MIB
    # A domain that does not run has no cache.
    await src.conn.define(guest_xml(src, "off"))
    with pytest.raises(OperationInvalid, match="domain is not running"):
        await src.conn.get_compression_cache("off")
    with pytest.raises(OperationInvalid, match="domain is not running"):
        await src.conn.set_compression_cache("off", 8 * MIB)


@pytest.mark.qemu
async def test_next_migration_uses_the_cache_unless_it_sets_its_own(
        qemu_pair: tuple[Host, Host]) -> None:
    src, dst = qemu_pair
    await guest(src)
    await src.conn.set_compression_cache("vm1", 8 * MIB)
    # (persistent there: its completed job stays once it left again)
    await migrate3(src.conn, "vm1", dst.conn, TypedParams(),
                   F.LIVE | F.COMPRESSED | F.PERSIST_DEST)
    done = await src.conn.job_info("vm1", completed=True)
    assert done.stat("compression_cache") == 8 * MIB
    # The cache is the running QEMU's: the destination's starts at QEMU's default, and a
    # migration's own size (--comp-xbzrle-cache) wins over it.
    assert await dst.conn.get_compression_cache("vm1") == QEMU_DEFAULT_CACHE
    await migrate3(dst.conn, "vm1", src.conn,
                   TypedParams.of({P.COMPRESSION_XBZRLE_CACHE: 16 * MIB}), F.LIVE | F.COMPRESSED)
    back = await dst.conn.job_info("vm1", completed=True)
    assert back.stat("compression_cache") == 16 * MIB


async def cli(host: Host, *args: str) -> tuple[int, str, str]:
    """``virtmig ARGS`` against ``host`` (a process: the daemon runs in this event loop)."""
    uri = f"{host.uri}?pkipath={session_pki().client()}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "virtmig.client.cli", "-c", uri, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


@pytest.mark.qemu
async def test_migrate_compcache_command(qemu_pair: tuple[Host, Host]) -> None:
    """virsh's ``migrate-compcache``: ``Compression cache: %.3lf %s`` (vshPrettyCapacity), no
    newline of its own (virsh's blank line after the output ends it); --size sets first."""
    src, _dst = qemu_pair
    await guest(src)
    assert await cli(src, "migrate-compcache", "vm1") == (0, "Compression cache: 64.000 MiB\n",
                                                          "")
    assert await cli(src, "-q", "migrate-compcache", "vm1", "--size", str(1 << 30)) == (
        0, "Compression cache: 1.000 GiB", "")
    assert await src.conn.get_compression_cache("vm1") == 1 << 30
    assert await cli(src, "-q", "migrate-compcache", "vm1", "--size", "5000") == (
        1, "", "error: invalid argument: parameter 'compression.xbzrle.cache' must be a power "
               "of two, got 5000\n")
