"""Network addresses as the portal, the gateway and the worker judge them alike."""

import ipaddress

# Gateways name the hosts they reach in process (a tunnel node's replicas) under RFC 6761's
# `.invalid`, which never resolves: such a host whose dial is gone fails at once instead of
# going to DNS, and the portal refuses it as a node's address (a node advertising one could
# have its traffic sent into another node's tunnel).
IN_PROCESS_SUFFIX = ".invalid"


def is_loopback_host(host: str) -> bool:
    """Return whether `host` (an IP literal or a name) names this machine only.

    True for 127.0.0.0/8, ::1 and "localhost" (any case). False for a DNS name, which others
    may resolve elsewhere ("localhost." too: the fully qualified form skips /etc/hosts on
    some resolvers and asks DNS), and for "" (every interface).
    Traffic to a loopback address never leaves the machine, so plain HTTP there exposes
    nothing that root on the host could not read anyway.
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_in_process_host(host: str) -> bool:
    """Return whether `host` is a name under IN_PROCESS_SUFFIX (any case, with or without
    the root's dot): a gateway's in-process host, never a real address."""
    return host.lower().rstrip(".").endswith(IN_PROCESS_SUFFIX)
