"""The ``--json`` output of the read commands: one documented, stable shape per command.

Each function turns a client value into plain JSON data (dicts, lists, strings, numbers, booleans,
``null``); :func:`dumps` writes one document.  The shapes are documented in the README ("Scriptable
output"): keys are only ever added, never renamed or removed, and the text fields use virsh's words
(``"shut off"``, ``"migration canceled"``) next to libvirt's numbers (``state_code``...).
Commands that stream (``event``, ``domjobinfo --watch``) print one compact document per line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from virtmig.proto.flags import DomainState, JobOperation, JobType, protocols_of, reason_label

if TYPE_CHECKING:  # (health imports gRPC; records' values are built by the commands that need them)
    from virtmig.client.health import HealthStatus
    from virtmig.client.records import DomainInfo, Event, JobInfo
    from virtmig.client.values import Domain, HostInfo

JSON = dict[str, Any]

_JOB_TYPES = {
    JobType.NONE: "none",
    JobType.BOUNDED: "bounded",
    JobType.UNBOUNDED: "unbounded",
    JobType.COMPLETED: "completed",
    JobType.FAILED: "failed",
    JobType.CANCELLED: "cancelled",
}


def dumps(data: object, *, line: bool = False) -> str:
    """One JSON document and a newline: indented, or compact on one line (``line``)."""
    import json  # here: only --json needs it

    if line:
        return json.dumps(data, separators=(",", ":")) + "\n"
    return json.dumps(data, indent=2) + "\n"


def state_json(state: int, reason: int) -> JSON:
    """A state and its reason: virsh's words and libvirt's numbers."""
    return {
        "state": DomainState(state).label,
        "state_code": int(state),
        "reason": reason_label(state, reason),
        "reason_code": int(reason),
    }


def domain_json(d: Domain) -> JSON:
    """One ``list`` entry."""
    return {
        "id": d.id if d.id >= 0 else None,
        "name": d.name,
        "uuid": d.uuid,
        **state_json(d.state, d.reason),
        "persistent": d.persistent,
    }


def dominfo_json(info: DomainInfo) -> JSON:
    d = info.domain
    return {
        **domain_json(d),
        "os_type": info.os_type,
        "vcpus": info.vcpus,
        "cpu_time_ns": info.cpu_time_ns,
        "max_memory_kib": info.max_memory_kib,
        "memory_kib": info.memory_kib,
        "autostart": False,
        "managed_save": False,
        "security_model": "none",
    }


def job_json(info: JobInfo) -> JSON:
    """A job's information: the fixed figures, then libvirt's typed stats by their names
    (``downtime``, ``memory_bps``, ``errmsg``...) as JSON numbers, booleans or strings."""
    operation = JobOperation(info.operation)
    return {
        "type": _JOB_TYPES.get(JobType(info.type), "unknown"),
        "type_code": int(info.type),
        "operation": operation.name.lower().replace("_", "-"),
        "operation_code": int(operation),
        "time_elapsed_ms": info.time_elapsed_ms,
        "data": {"total": info.data_total, "processed": info.data_processed,
                 "remaining": info.data_remaining},
        "memory": {"total": info.mem_total, "processed": info.mem_processed,
                   "remaining": info.mem_remaining},
        "stats": {p.name: p.value for p in info.stats},
        "phase": info.phase,
        "error": info.error,
    }


def host_json(host: HostInfo) -> JSON:
    """``nodeinfo``: the host's figures and what its daemon can do."""
    return {
        "hostname": host.hostname,
        "host_uuid": host.host_uuid,
        "cpu_model": host.arch,
        "cpus": host.cpus,
        "memory_kib": host.memory_kib,
        "backend": host.backend,
        "version": host.version,
        "features": sorted(host.features),
        "migration_protocols": [str(p) for p in protocols_of(host.features)],
        "active_domains": host.active_domains,
        "inactive_domains": host.inactive_domains,
    }


# What ``capabilities`` reports beside the host: the URI transports the daemon accepts.
URI_TRANSPORTS = ("virtmig+tls", "virtmig+tcp", "virtmig+unix")


def capabilities_json(host: HostInfo) -> JSON:
    """``capabilities``: the host, its migration features, and the guests it can run."""
    return {
        "host": {
            "uuid": host.host_uuid,
            "arch": host.arch,
            "cpus": host.cpus,
            "memory_kib": host.memory_kib,
            "migration": {
                "live": True,
                "uri_transports": list(URI_TRANSPORTS),
                "protocols": [str(p) for p in protocols_of(host.features)],
            },
            "features": sorted(host.features),
        },
        "guests": [{"os_type": "hvm", "arch": host.arch, "domain_type": host.backend}],
    }


def health_json(health: HealthStatus) -> JSON:
    """``health --json``: the service asked about, grpc.health.v1's status name and number."""
    return {"service": health.service, "status": health.status, "status_code": health.code}


def event_json(ev: Event) -> JSON:
    """One ``event`` line."""
    return {
        "timestamp_ms": ev.timestamp_ms,
        "event": ev.kind,
        "domain": {"name": ev.domain_name, "uuid": ev.domain_uuid},
        "event_code": ev.event,
        "detail_code": ev.detail,
        "description": ev.description,
        "iteration": ev.iteration,
        "job": job_json(ev.job) if ev.job is not None else None,
    }
