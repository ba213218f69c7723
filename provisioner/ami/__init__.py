"""The AMI layer: background connections per Asterisk, reloads, PJSIP queries.

Typical daemon use, per ``[[asterisk]]`` server (as :class:`~.pbx.AmiPbx` does it)::

    client = AmiClient(server, config.ami)
    # Reloads on a session of their own: Asterisk answers one only when it is done,
    # and runs a session's actions one after another.
    quiet = AmiClient(server.model_copy(update={"events": "off"}), config.ami, role="reload")
    reloads = ReloadCoordinator(quiet, config.ami)
    ops = PjsipOps(client)
    client.on_event("ContactStatus", on_status)   # quick, non-blocking callbacks
    async with asyncio.TaskGroup() as tg:
        tg.create_task(client.run(stop))
        tg.create_task(quiet.run(stop))
        tg.create_task(reloads.run(stop))
    # elsewhere: reloads.request(); await ops.expire("ep_cache", "1001")

Setting ``stop`` (an :class:`asyncio.Event`) ends the coroutines cleanly.
"""

from __future__ import annotations

from .actions import AmiAction, AmiMessage, build_action
from .client import AmiClient, AmiHealth, AmiReply, EventCallback
from .errors import (
    AmiActionFailed,
    AmiConnectionLost,
    AmiError,
    AmiLoginFailed,
    AmiNotAsterisk,
    AmiNotConnected,
    AmiProtocolError,
    AmiTimeout,
)
from .reload import EndpointDetail, PjsipOps, ReloadCoordinator, ReloadOutcome

__all__ = [
    "AmiAction",
    "AmiActionFailed",
    "AmiClient",
    "AmiConnectionLost",
    "AmiError",
    "AmiHealth",
    "AmiLoginFailed",
    "AmiMessage",
    "AmiNotAsterisk",
    "AmiNotConnected",
    "AmiProtocolError",
    "AmiReply",
    "AmiTimeout",
    "EndpointDetail",
    "EventCallback",
    "PjsipOps",
    "ReloadCoordinator",
    "ReloadOutcome",
    "build_action",
]
