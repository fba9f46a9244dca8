"""Leasing upstreams: the lease manager (`LeaseManager`), the one door through which the gateway
takes and gives back upstreams, reads pools and feeds health."""

from core.leasing.manager import LeaseCallback, LeaseEvent, LeaseEventKind, LeaseManager

__all__ = ["LeaseCallback", "LeaseEvent", "LeaseEventKind", "LeaseManager"]
