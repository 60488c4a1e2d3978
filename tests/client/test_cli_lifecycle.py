"""The ``virtmig`` CLI against two real ``virtmigd`` processes: lifecycle commands, live, offline,
persistent and renaming migrations, host commands, and one clear line per error.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.client import cli_helpers
from tests.client.cli_helpers import Daemon, domain_xml, fails, migration_id, ok, virtmig

# The shared fixtures, bound here so that pytest finds them.
daemons = cli_helpers.daemons


def test_lifecycle_and_live_migration(daemons: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    src, dst = daemons
    xml = tmp_path / "web.xml"
    xml.write_text(domain_xml("web"))

    assert ok(src.uri, "define", str(xml)) == f"Domain 'web' defined from {xml}\n"
    assert ok(src.uri, "list") == " Id   Name   State\n--------------------\n"
    assert ok(src.uri, "list", "--all") == (
        " Id   Name   State\n"
        "-----------------------\n"
        " -    web    shut off\n"
    )
    assert ok(src.uri, "list", "--inactive") == ok(src.uri, "list", "--all")
    assert ok(src.uri, "start", "web") == "Domain 'web' started\n"
    assert ok(src.uri, "list") == (
        " Id   Name   State\n"
        "----------------------\n"
        " 1    web    running\n"
    )
    assert ok(src.uri, "domstate", "web") == "running\n"
    assert ok(src.uri, "domstate", "--reason", "web") == "running (booted)\n"

    info = ok(src.uri, "dominfo", "web").splitlines()
    uuid = info[2].split()[1]
    assert info == [
        "Id:             1",
        "Name:           web",
        f"UUID:           {uuid}",
        "OS Type:        hvm",
        "State:          running",
        "CPU(s):         1",
        *([line for line in info if line.startswith("CPU time:")]),
        "Max memory:     65536 KiB",
        "Used memory:    65536 KiB",
        "Persistent:     yes",
        "Autostart:      disable",
        "Managed save:   no",
        "Security model: none",
        "Security DOI:   0",
    ]
    # By id and by UUID, like virsh.
    assert ok(src.uri, "domstate", "1") == "running\n"
    assert ok(src.uri, "domstate", "--domain", uuid) == "running\n"

    assert ok(src.uri, "suspend", "web") == "Domain 'web' suspended\n"
    assert ok(src.uri, "domstate", "--reason", "web") == "paused (user)\n"
    assert ok(src.uri, "resume", "web") == "Domain 'web' resumed\n"
    assert ok(src.uri, "domstate", "--reason", "web") == "running (unpaused)\n"

    dumped = ok(src.uri, "dumpxml", "web")
    assert "<name>web</name>" in dumped and uuid in dumped
    assert "<name>web</name>" in ok(src.uri, "dumpxml", "--inactive", "web")
    assert "<name>web</name>" in ok(src.uri, "dumpxml", "--migratable", "web")

    res = virtmig(src.uri, "migrate", "--live", "--verbose", "web", dst.uri)
    assert res.returncode == 0, res.stderr
    mid = migration_id(src.uri, "web")
    assert mid == migration_id(dst.uri, "web") and len(mid) == 32
    assert res.stdout == f"Migration id: {mid}\nMigration protocol: v3+params\n"
    assert res.stderr.endswith("\rMigration: [100.00 %]\n")
    assert "error" not in res.stderr

    # The source keeps its persistent definition, shut off (migrated); the guest runs on dst.
    assert ok(src.uri, "list", "--all") == (
        " Id   Name   State\n"
        "-----------------------\n"
        " -    web    shut off\n"
    )
    assert ok(src.uri, "domstate", "--reason", "web") == "shut off (migrated)\n"
    assert ok(dst.uri, "list", "--all") == (
        " Id   Name   State\n"
        "----------------------\n"
        " 1    web    running\n"
    )
    assert ok(dst.uri, "domstate", "--reason", "web") == "running (migrated)\n"
    assert "Persistent:     no" in ok(dst.uri, "dominfo", "web")

    assert ok(dst.uri, "destroy", "web") == "Domain 'web' destroyed\n"
    assert ok(src.uri, "undefine", "web") == "Domain 'web' has been undefined\n"
    assert ok(src.uri, "list", "--all") == " Id   Name   State\n--------------------\n"


def test_offline_persistent_and_rename_migrations(daemons: tuple[Daemon, Daemon],
                                                  tmp_path: Path) -> None:
    src, dst = daemons
    for name in ("cold", "warm"):
        (tmp_path / f"{name}.xml").write_text(domain_xml(name))
        ok(src.uri, "define", str(tmp_path / f"{name}.xml"))

    assert ok(src.uri, "migrate", "--offline", "--persistent", "cold", dst.uri) == ""
    assert ok(dst.uri, "list", "--all") == (
        " Id   Name   State\n"
        "-----------------------\n"
        " -    cold   shut off\n"
    )
    assert "Persistent:     yes" in ok(dst.uri, "dominfo", "cold")
    assert "cold" in ok(src.uri, "list", "--inactive")

    # Params from options: a rename, with the source definition removed.
    ok(src.uri, "start", "warm")
    assert ok(src.uri, "migrate", "--live", "--persistent", "--undefinesource",
              "--dname", "warm2", "--bandwidth", "1000", "warm", dst.uri) == ""
    assert "warm" not in ok(src.uri, "list", "--all")
    assert ok(dst.uri, "domstate", "--reason", "warm2") == "running (migrated)\n"
    assert "Persistent:     yes" in ok(dst.uri, "dominfo", "warm2")


def test_errors_are_one_clear_line(daemons: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    src, dst = daemons
    (tmp_path / "vm.xml").write_text(domain_xml("vm"))
    ok(src.uri, "define", str(tmp_path / "vm.xml"))
    ok(src.uri, "start", "vm")

    assert fails(src.uri, "dominfo", "nosuch") == "error: failed to get domain 'nosuch'\n"
    assert fails(src.uri, "migrate", "--live", "nosuch", dst.uri) == (
        "error: failed to get domain 'nosuch'\n")
    assert fails(src.uri, "start", "vm") == "error: Domain is already active\n"
    assert fails(src.uri, "suspend", "--domain", "nosuch") == (
        "error: failed to get domain 'nosuch'\n")

    err = fails(src.uri, "define", str(tmp_path / "none.xml"))
    assert err == (f"error: Failed to open file '{tmp_path / 'none.xml'}': "
                   "No such file or directory\n")
    (tmp_path / "bad.xml").write_text("<domain type='test'><name>x</name>")
    err = fails(src.uri, "define", str(tmp_path / "bad.xml"))
    assert err.startswith(f"error: Failed to define domain from {tmp_path / 'bad.xml'}\nerror: ")

    assert fails(src.uri, "migrate", "--live", "--offline", "vm", dst.uri) == (
        "error: Options --live and --offline are mutually exclusive\n")

    # Options this version cannot do: parsed, passed on, refused with the daemon's reason.
    err = fails(src.uri, "migrate", "--live", "--copy-storage-all", "vm", dst.uri)
    assert err == ("error: argument unsupported: migration flag VIR_MIGRATE_NON_SHARED_DISK is "
                   "not supported by this host\n")
    err = fails(src.uri, "migrate", "--live", "--comp-mt-level", "3", "vm", dst.uri)
    assert err == "error: invalid argument: Turn multithread compression on to tune it\n"
    err = fails(src.uri, "migrate", "--live", "--compressed", "vm", dst.uri)  # test backend
    assert err == ("error: argument unsupported: migration flag VIR_MIGRATE_COMPRESSED is not "
                   "supported by this host\n")
    err = fails(src.uri, "migrate", "--live", "--direct", "vm", dst.uri)
    assert err == ("error: argument unsupported: direct migration is not supported by the source "
                   "host\n")
    # Nothing happened to the guest.
    assert ok(src.uri, "domstate", "--reason", "vm") == "running (booted)\n"
    assert ok(dst.uri, "list", "--all") == " Id   Name   State\n--------------------\n"

    err = fails(src.uri, "migrate", "--live", "vm", "virtmig+tls://127.0.0.1:1")
    assert err.startswith("error: failed to connect to the destination "
                          "'virtmig+tls://127.0.0.1:1'\nerror: unable to connect")
    err = fails("virtmig+tls://127.0.0.1:1", "list")
    assert err.startswith("error: failed to connect to the hypervisor\nerror: unable to connect")
    err = fails("bogus://x", "list")
    assert err.startswith("error: failed to connect to the hypervisor\n"
                          "error: invalid argument: unsupported connection URI 'bogus://x'")


def test_host_commands_and_default_uri(daemons: tuple[Daemon, Daemon]) -> None:
    src, _dst = daemons
    env = {**os.environ, "VIRTMIG_DEFAULT_URI": src.uri}
    res = virtmig(None, "hostname", env=env)
    assert (res.returncode, res.stdout) == (0, "src.test\n")

    lines = ok(src.uri, "version").splitlines()
    assert lines[0].startswith("Compiled against library: virtmig ")
    assert lines[1].startswith("Using library: virtmig ")
    assert lines[2].startswith("Using API: virtmig ")
    assert lines[3].startswith("Running hypervisor: test ")

    node = dict(line.split(":", 1) for line in ok(src.uri, "nodeinfo").splitlines())
    assert set(node) == {"CPU model", "CPU(s)", "Memory size", "Host UUID", "Backend",
                         "Features", "Migration protocols"}
    assert node["Migration protocols"].split() == ["v3+params", "v3", "v2"]
    assert node["Memory size"].endswith(" KiB")
    assert node["Backend"].strip() == "test"
    assert "V3" in node["Features"].split()
