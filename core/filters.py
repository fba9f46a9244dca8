"""Which upstreams a lease request accepts.

A `Filter` is data (so a SQL adapter can translate the parts it understands) that compiles once
into a plain predicate for the in-process path.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from core.endpoints import Scheme
from core.models import LeaseRequest, Upstream

__all__ = ["Filter", "GeoRadius", "Predicate", "restricted_to_country"]

Predicate = Callable[[Upstream], bool]

_EARTH_RADIUS_KM = 6371.0088


@dataclass(slots=True, frozen=True)
class GeoRadius:
    latitude: float
    longitude: float
    radius_km: float

    def contains(self, latitude: float, longitude: float) -> bool:
        return _haversine_km(self.latitude, self.longitude, latitude, longitude) <= self.radius_km


@dataclass(slots=True, frozen=True)
class Filter:
    """All given conditions must hold (an empty filter matches everything).

    Equality fields compare exactly (country case-insensitively). `tags_all` needs every tag,
    `tags_any` at least one. `all_of` / `any_of` / `none_of` nest further filters. `predicate`
    is arbitrary Python, evaluated last.
    """

    country: str | None = None
    city: str | None = None
    asn: int | None = None
    isp: str | None = None
    source: str | None = None
    scheme: Scheme | None = None
    tags_all: frozenset[str] = frozenset()
    tags_any: frozenset[str] = frozenset()
    near: GeoRadius | None = None
    all_of: tuple[Filter, ...] = ()
    any_of: tuple[Filter, ...] = ()
    none_of: tuple[Filter, ...] = ()
    predicate: Predicate | None = None
    _compiled: Predicate = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.country is not None:
            object.__setattr__(self, "country", self.country.upper())
        object.__setattr__(self, "_compiled", self._compile())

    def matches(self, upstream: Upstream) -> bool:
        return self._compiled(upstream)

    def _compile(self) -> Predicate:
        checks: list[Predicate] = []
        for name in ("country", "city", "asn", "isp", "source"):
            wanted = getattr(self, name)
            if wanted is not None:
                checks.append(_attribute_equals(name, wanted))
        if self.scheme is not None:
            scheme = self.scheme
            checks.append(lambda u: u.endpoint.scheme is scheme)
        if self.tags_all:
            tags_all = self.tags_all
            checks.append(lambda u: tags_all <= u.tags)
        if self.tags_any:
            tags_any = self.tags_any
            checks.append(lambda u: not tags_any.isdisjoint(u.tags))
        if self.near is not None:
            near = self.near
            checks.append(
                lambda u: (
                    u.latitude is not None
                    and u.longitude is not None
                    and near.contains(u.latitude, u.longitude)
                )
            )
        for nested in self.all_of:
            checks.append(nested.matches)
        if self.any_of:
            alternatives = tuple(f.matches for f in self.any_of)
            checks.append(lambda u: any(alt(u) for alt in alternatives))
        if self.none_of:
            excluded = tuple(f.matches for f in self.none_of)
            checks.append(lambda u: not any(ex(u) for ex in excluded))
        if self.predicate is not None:
            checks.append(self.predicate)
        if not checks:
            return _always
        if len(checks) == 1:
            return checks[0]
        frozen = tuple(checks)
        return lambda u: all(check(u) for check in frozen)


def _always(_: Upstream) -> bool:
    return True


def _attribute_equals(name: str, wanted: object) -> Predicate:
    return lambda u: getattr(u, name) == wanted


def _haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dphi = phi2 - phi1
    dlambda = math.radians(lon2 - lon1)
    a = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlambda / 2) ** 2
    return 2 * _EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def restricted_to_country(request: LeaseRequest, country: str) -> LeaseRequest:
    """`request` narrowed to upstreams of `country` (a session rebinding to its old country)."""
    filters = request.filters
    if filters is None:
        filters = Filter(country=country)
    elif filters.country is None:
        filters = dataclasses.replace(filters, country=country)
    elif filters.country != country.upper():
        filters = Filter(all_of=(filters, Filter(country=country)))  # matches nothing: says so
    return dataclasses.replace(request, filters=filters)
