"""Confinement: whether a path or URI someone else supplied lies inside a set of roots.

One function decides it for every path a request names (``service.paths.PathPolicy``) and for
every file an archive lists or links to when ingest is confined (``IngestConfig.confine_to``,
set by the service; ``--confine-to`` on the CLI): :meth:`Roots.resolve`.

* A local path (or a ``file:`` URI of an absolute path) must be absolute; it is resolved with
  ``os.path.realpath``, so ``..`` and symlinks pointing out of a root are outside like any
  other path, and the resolved path is what the caller gets back and uses.
* A URI is parsed with :mod:`urllib.parse` and refused with a query string (pyarrow's
  ``FileSystem.from_uri`` obeys ``?endpoint_override=...&scheme=http``) other than the one
  its root is configured with (a workspace URI may carry its endpoint), a fragment,
  credentials, a percent-encoded separator, dot, percent sign or control character (pyarrow
  decodes ``%2e%2e`` into ``..``), a space or control character, a backslash, or a ``.`` /
  ``..`` segment; repeated slashes collapse. It is inside a root that is a URI of the same
  scheme and host whose key segments are a prefix of its own. The normalised URI is returned
  (with the query of the root, where the operator configured one, e.g. an endpoint).

A refusal is a :class:`PathRefused` whose message says why the value was refused but never
names a root, a resolved path or whether anything exists there: callers add which field (or
which row of an archive) it was.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass

from medcurate.errors import MedcurateError

OUTSIDE = "outside the data roots"
_ESCAPE = re.compile(r"%(?P<hex>[0-9A-Fa-f]{2})?")
# Characters whose percent-encoding a request may not use: separators, dots, escapes, the URI
# delimiters pyarrow would decode into structure, and control characters.
_FORBIDDEN_ENCODED = set(b"/\\.%?#@:;") | set(range(0x20)) | {0x7F}
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


class PathRefused(MedcurateError):
    """A path or URI outside what may be read, or one that cannot be checked (HTTP 403)."""


class RelativePath(PathRefused):
    """A local path that is not absolute: no reader knows the directory it is relative to."""


def is_uri(value: str) -> bool:
    """A URI other than ``file:``, which names a local path (``resolve_filesystem``'s rule)."""
    return "://" in value and not value.startswith("file://")


@dataclass(frozen=True)
class Uri:
    """A URI as confinement compares it: scheme, host (bucket), key segments (decoded)."""

    scheme: str
    netloc: str
    segments: tuple[str, ...]  # as written (percent escapes kept): what the URI is rebuilt from
    query: str = ""

    @property
    def key(self) -> tuple[str, ...]:
        return tuple(urllib.parse.unquote(segment) for segment in self.segments)

    def under(self, root: Uri) -> bool:
        return (self.scheme == root.scheme and self.netloc == root.netloc
                and self.key[:len(root.key)] == root.key)

    def text(self, query: str = "") -> str:
        path = "/".join(self.segments)
        uri = f"{self.scheme}://{self.netloc}" + (f"/{path}" if path else "")
        return f"{uri}?{query}" if query else uri


def _check_characters(value: str) -> None:
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        raise PathRefused("a URI may not hold spaces or control characters")
    if "\\" in value:
        raise PathRefused("a URI may not hold a backslash")
    if "?" in value:
        raise PathRefused("a URI may not carry a query string")
    if "#" in value:
        raise PathRefused("a URI may not carry a fragment")
    for match in _ESCAPE.finditer(value):
        if match["hex"] is None:
            raise PathRefused("a URI may not hold a '%' that is not a percent-encoding")
        if int(match["hex"], 16) in _FORBIDDEN_ENCODED:
            raise PathRefused("a URI may not percent-encode a separator, dot, '%' or control "
                              "character")
    try:
        urllib.parse.unquote_to_bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise PathRefused("a URI's percent-encodings must be UTF-8") from None


def _segments(path: str, strict: bool) -> tuple[str, ...]:
    segments = tuple(part for part in path.split("/") if part)
    if strict and any(part in (".", "..") for part in segments):
        raise PathRefused("a URI may not hold '.' or '..' segments")
    return segments


def parse_uri(value: str, *, trusted: bool = False) -> Uri:
    """``value`` parsed and normalised; a request's URI (``trusted=False``) is refused for
    anything that could make it name something other than what its text shows. A query is
    kept as written: the operator's roots may carry one (e.g. an endpoint), and a request's
    may only repeat its root's (``Roots.resolve``)."""
    base, mark, query = value.partition("?")
    if not trusted:
        _check_characters(base)
        if (mark and not query) or "#" in query:
            raise PathRefused("a URI may not carry a query string" if "#" not in query
                              else "a URI may not carry a fragment")
    try:
        parts = urllib.parse.urlsplit(base)
    except ValueError:
        raise PathRefused("not a valid URI") from None
    if not _SCHEME.fullmatch(parts.scheme or "") or not parts.netloc or "://" not in base:
        raise PathRefused("not a valid URI: it needs a scheme and a host or bucket")
    if not trusted and parts.fragment:
        raise PathRefused("a URI may not carry a fragment")
    return Uri(parts.scheme.lower(), parts.netloc, _segments(parts.path, not trusted), query)


def local_path(value: str) -> str:
    """The absolute path a local path or ``file:`` URI names, not yet resolved; a relative
    path (``file://relative/x`` included) is refused: it would resolve against the working
    directory of whichever process reads it."""
    if value.startswith("file:"):
        rest = value[len("file:"):]
        if not rest.startswith("//"):
            raise RelativePath("a file: URI must be file:///ABSOLUTE/PATH")
        _check_characters(value)
        rest = rest[2:]
        if rest.startswith("localhost/"):
            rest = rest[len("localhost"):]
        if not rest.startswith("/"):
            raise RelativePath("a file: URI must be file:///ABSOLUTE/PATH (file://NAME/... "
                              "names a host, or a path relative to the working directory)")
        value = rest
    if "\0" in value:
        raise PathRefused("a path may not hold a NUL character")
    if not os.path.isabs(value):
        raise RelativePath("a relative path resolves against a working directory no client "
                          "knows; name an absolute path")
    return value


def is_relative(value: str) -> bool:
    """Whether ``value`` is a local path (or ``file:`` URI) that is not absolute."""
    if is_uri(value):
        return False
    try:
        local_path(value)
    except RelativePath:
        return True
    except PathRefused:
        return False
    return False


def realpath(path: str) -> str:
    """``os.path.realpath``, which (unlike ``Path.resolve`` on Python 3.11) never raises for
    a symlink loop: such a path resolves to itself."""
    return os.path.realpath(path)


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


class Roots:
    """Local folders (resolved here, as given or relative to this process's directory) and
    URI prefixes; :meth:`resolve` confines a value to them."""

    def __init__(self, roots: Iterable[str]):
        self.local: list[str] = []
        self.uris: list[Uri] = []
        for root in dict.fromkeys(roots):
            if is_uri(root):
                self.uris.append(parse_uri(root.rstrip("/"), trusted=True))
            else:
                path = root[len("file://"):] if root.startswith("file://") else root
                self.local.append(realpath(os.path.abspath(os.path.expanduser(path))))

    def __bool__(self) -> bool:
        return bool(self.local or self.uris)

    def contains(self, real: str) -> bool:
        """Whether a resolved local path lies inside a local root."""
        return any(_within(real, root) for root in self.local)

    def resolve(self, value: str) -> str:
        """``value`` resolved (local: realpath; URI: normalised) if it lies inside a root;
        else :class:`PathRefused`, whose message names neither the roots nor the target."""
        if not isinstance(value, str) or not value:
            raise PathRefused("not a path")
        if is_uri(value):
            uri = parse_uri(value)
            if "@" in uri.netloc and all(uri.netloc != root.netloc for root in self.uris):
                raise PathRefused("a URI may not carry credentials")
            for root in self.uris:
                if uri.under(root) and uri.query in ("", root.query):
                    return uri.text(root.query)
            if uri.query:  # only the very query its root is configured with (an endpoint)
                raise PathRefused("a URI may not carry a query string")
            raise PathRefused(OUTSIDE)
        path = local_path(value)
        try:
            real = realpath(path)
        except (ValueError, OSError):  # e.g. a lone surrogate, which no file name holds
            raise PathRefused("not a valid path") from None
        if self.contains(real):
            return real
        raise PathRefused(OUTSIDE)
