"""Every serving write, in explicit do_<verb>() functions (nodes, tokens, deployments, keys)."""

from __future__ import annotations

from serving.services.deployments import (
    do_create_deployment,
    do_delete_deployment,
    do_rollback_deployment,
    do_scale_deployment,
    do_update_deployment,
)
from serving.services.keys import do_create_api_key, do_revoke_api_key
from serving.services.nodes import (
    authenticate_node,
    do_create_join_token,
    do_deregister_node,
    do_drain_node,
    do_heartbeat,
    do_register_node,
    do_remove_node,
    do_revoke_join_token,
    sweep_nodes,
)
from serving.services.reconcile import reconcile_all, reconcile_deployment

__all__ = [
    "authenticate_node",
    "do_create_api_key",
    "do_create_deployment",
    "do_create_join_token",
    "do_delete_deployment",
    "do_deregister_node",
    "do_drain_node",
    "do_heartbeat",
    "do_register_node",
    "do_remove_node",
    "do_revoke_api_key",
    "do_revoke_join_token",
    "do_rollback_deployment",
    "do_scale_deployment",
    "do_update_deployment",
    "reconcile_all",
    "reconcile_deployment",
    "sweep_nodes",
]
