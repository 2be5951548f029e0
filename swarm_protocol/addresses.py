"""Network addresses as the portal, the gateway and the worker judge them alike."""

import ipaddress


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
