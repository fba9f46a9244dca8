"""Filters to SQL: the part of a `Filter` the database can evaluate, and whether that is all.

`to_sql` returns a clause every matching upstream satisfies. When the filter holds something
SQL cannot say (a Python predicate, a geo radius, or such a part under `none_of`), the clause is
only a necessary condition and `exact` is False: the adapter then confirms each candidate with
`Filter.matches` inside the same transaction.

Comparisons with a NULL column yield NULL in SQL but False in Python; `none_of` coalesces
before negating, so `none_of=(Filter(country="AR"),)` keeps upstreams with no country, as the
in-process filter does.
"""

from __future__ import annotations

from typing import NamedTuple

from sqlalchemy import ColumnElement, and_, false, func, not_, or_, true

from core.filters import Filter
from core.storage.sql.tables import TAG_SEPARATOR, upstreams

__all__ = ["SqlFilter", "to_sql"]

_EQUALITIES = ("country", "city", "asn", "isp", "source")


class SqlFilter(NamedTuple):
    clause: ColumnElement[bool]
    #: True when `clause` alone decides: no candidate needs checking in Python.
    exact: bool


def to_sql(flt: Filter) -> SqlFilter:
    parts: list[ColumnElement[bool]] = []
    exact = True
    for name in _EQUALITIES:
        wanted = getattr(flt, name)
        if wanted is not None:
            parts.append(upstreams.c[name] == wanted)
    if flt.scheme is not None:
        parts.append(upstreams.c.scheme == flt.scheme.value)
    for tag in sorted(flt.tags_all):
        parts.append(_has_tag(tag))
    if flt.tags_any:
        parts.append(or_(*(_has_tag(tag) for tag in sorted(flt.tags_any))))
    if flt.near is not None:
        # Only "has a position" is said in SQL; the distance is checked in Python.
        parts.append(and_(upstreams.c.latitude.is_not(None), upstreams.c.longitude.is_not(None)))
        exact = False
    for nested in flt.all_of:
        inner = to_sql(nested)
        parts.append(inner.clause)
        exact &= inner.exact
    if flt.any_of:
        alternatives = [to_sql(nested) for nested in flt.any_of]
        # Each alternative's clause is necessary for it, so their OR is necessary for any_of.
        parts.append(or_(*(alt.clause for alt in alternatives)))
        exact &= all(alt.exact for alt in alternatives)
    if flt.none_of:
        excluded = [to_sql(nested) for nested in flt.none_of]
        if all(ex.exact for ex in excluded):
            parts.append(not_(func.coalesce(or_(*(ex.clause for ex in excluded)), false())))
        else:
            exact = False  # NOT of a mere necessary condition would drop real matches
    if flt.predicate is not None:
        exact = False
    if not parts:
        return SqlFilter(true(), exact)
    return SqlFilter(and_(*parts) if len(parts) > 1 else parts[0], exact)


def _has_tag(tag: str) -> ColumnElement[bool]:
    return upstreams.c.tags.contains(TAG_SEPARATOR + tag + TAG_SEPARATOR, autoescape=True)
