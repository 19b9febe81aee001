"""What a destination already holds, and whether the command at hand is what made it.

A published destination is never overwritten. Re-running the command that published it (a
scheduler's retry, a pipeline re-run after the driver died past the commit) is not a mistake,
though: it succeeds with nothing to do, as `sync` skips a published version. Anything else there
(another recipe, another source, the same request on a source that changed since) is refused,
naming what the destination holds.

"The same command" is decided in two steps, so that a refusal comes before planning: the
published manifest's source URI, whole recipe (its evaluation and gates included: asking for an
evaluation the published result lacks is not a no-op) and tool version first, the plan id (the
source's identity and the shard size, a budget's assignment) once the command has planned.
`sweep`, which reuses a point published by an earlier sweep, checks the source's identity (file
keys, sizes, ETags) without planning: a budget's plan would run its measure pass again.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from flows.plan import TOOL_VERSION, Plan, source_identity
from flows.recipe import Recipe
from flows.source_check import file_tags
from flows.versions import MANIFEST_NAME
from infra.errors import AlreadyExists, StorageError
from infra.publish import is_published
from infra.safetensors import build_catalog
from infra.storage import open_storage

__all__ = [
    "PublishedConversion", "published_conversion", "check_published_request", "check_same_plan",
    "published_as_planned", "check_same_source", "current_identity", "already_holds",
]

_NEVER_OVERWRITTEN = "choose another destination (published versions are never overwritten)"
_CHANGED_SOURCE = (f"{_NEVER_OVERWRITTEN}; `quantfleet sync` publishes each state of a source as a version "
                   "of its own")


class PublishedConversion(NamedTuple):
    """The request a published destination was made from, as its manifest records it."""

    dest_uri: str
    plan_id: str
    source_uri: str
    source_identity: str
    recipe: dict[str, object]
    tool_version: str

    def describe(self) -> str:
        label = self.recipe.get("name") or self.recipe.get("scheme") or "an unknown recipe"
        if not self.plan_id:
            return "no readable manifest"
        return f"plan {self.plan_id}: {label} of {self.source_uri}"


def published_conversion(dest_uri: str) -> PublishedConversion | None:
    """What is published at `dest_uri` (None: nothing). A manifest that cannot be read gives a
    record that matches no request."""
    dest = open_storage(dest_uri)
    if not is_published(dest, ""):
        return None
    try:
        data = json.loads(dest.read_bytes(MANIFEST_NAME))
        return PublishedConversion(dest.uri(), str(data["plan_id"]), str(data["source"]["uri"]),
                                   str(data["source"]["identity"]), dict(data["recipe"]),
                                   str(data["tool_version"]))
    except (StorageError, ValueError, KeyError, TypeError):
        return PublishedConversion(dest.uri(), "", "", "", {}, "")


def check_published_request(dest_uri: str, source_uri: str, recipe: Recipe) -> PublishedConversion | None:
    """None when nothing is published at `dest_uri`; the published conversion when the same
    request (source URI, recipe, tool version) made it, for `check_same_plan` once planned.
    Raises AlreadyExists, naming what is there, for anything else."""
    published = published_conversion(dest_uri)
    if published is None:
        return None
    same = (published.source_uri == open_storage(source_uri).uri()
            and published.recipe == recipe.model_dump(mode="json")
            and published.tool_version == TOOL_VERSION)
    if not same:
        raise already_holds(dest_uri, published)
    return published


def already_holds(dest_uri: str, published: PublishedConversion | None = None) -> AlreadyExists:
    """The refusal of a destination that holds a published conversion, naming it."""
    published = published or published_conversion(dest_uri)
    what = f" ({published.describe()})" if published is not None else ""
    return AlreadyExists(f"{open_storage(dest_uri).uri()}: already holds a published conversion{what}; "
                         f"{_NEVER_OVERWRITTEN}")


def check_same_plan(published: PublishedConversion, plan: Plan) -> None:
    """Refuse a request that matches the published one but plans differently: the source changed
    since (or the shard size differs)."""
    if published.plan_id != plan.plan_id:
        raise AlreadyExists(
            f"{published.dest_uri}: already holds this recipe's conversion of an earlier state of the "
            f"source, or with another shard size (published plan {published.plan_id}; this command plans "
            f"{plan.plan_id}); {_CHANGED_SOURCE}")


def current_identity(source_uri: str) -> str:
    """The source's identity as a plan records it (file keys, sizes, ETags): headers only."""
    source = open_storage(source_uri)
    catalog = build_catalog(source)
    return source_identity(catalog, file_tags(source, catalog.files))


def check_same_source(published: PublishedConversion, identity: str, source_uri: str) -> None:
    """Refuse a request that matches the published one but whose source (now `identity`,
    `current_identity`) changed since."""
    if identity != published.source_identity:
        raise AlreadyExists(f"{published.dest_uri}: already holds this recipe's conversion of an earlier "
                            f"state of {open_storage(source_uri).uri()} (plan {published.plan_id}); "
                            f"{_CHANGED_SOURCE}")


def published_as_planned(dest_uri: str, plan: Plan) -> PublishedConversion | None:
    """The conversion published at `dest_uri` if it is `plan`'s own (an overlapping run of the same
    command committed first), else None."""
    published = published_conversion(dest_uri)
    if published is None or published.plan_id != plan.plan_id:
        return None
    return published if published.recipe == plan.recipe.model_dump(mode="json") else None
