"""Prefect flows: composition only.

Importing this package, as a Prefect worker does before it runs any of these flows, quiets the
libraries' known harmless messages (``dermt2im.core.quiet``) and sends the domain's own log lines,
progress included, to the flow run's logs at INFO level: a worker started without
PREFECT_LOGGING_EXTRA_LOGGERS=dermt2im would otherwise show none of them.
"""

import logging

from dermt2im.core.quiet import quiet_libraries


def _domain_logs_to_prefect() -> None:
    """What PREFECT_LOGGING_EXTRA_LOGGERS=dermt2im does, for a flow run whose Prefect logging is set
    up before this package is imported (a worker's flow-run process)."""
    domain = logging.getLogger("dermt2im")
    if domain.level == logging.NOTSET or domain.level > logging.INFO:
        domain.setLevel(logging.INFO)
    if not domain.handlers:  # PREFECT_LOGGING_EXTRA_LOGGERS gives it the same handlers
        for handler in logging.getLogger("prefect.extra").handlers:
            domain.addHandler(handler)


quiet_libraries()
_domain_logs_to_prefect()
