"""Image references as Docker reads them: ``[registry/]repository[:tag][@digest]``.

The grammar is distribution's (github.com/distribution/reference) and the defaults Docker
Hub's: no registry means ``docker.io``, a one-component repository there is ``library/...``,
``index.docker.io`` is ``docker.io``, and neither tag nor digest means ``:latest``. A reference
comes from a job's CI file, so anything outside the grammar is refused with the text quoted
rather than handed to skopeo to interpret.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from kata_ci.errors import ImagePullFailure

DOCKER_HUB = "docker.io"
DEFAULT_TAG = "latest"
MAX_NAME = 255  # distribution's bound on registry/repository

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|-+)"
_COMPONENT = re.compile(rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*")
_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_REGISTRY = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[a-fA-F0-9:]+\])(?::[0-9]{{1,5}})?")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
DIGEST = re.compile(r"sha256:[a-f0-9]{64}")


@dataclass(frozen=True)
class Reference:
    registry: str
    repository: str
    tag: str | None
    digest: str | None  # when both are given the digest is what is pulled

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def canonical(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    def transport(self) -> str:
        """What skopeo takes: by digest when one is known (a tag can move meanwhile)."""
        if self.digest is not None:
            return f"docker://{self.name}@{self.digest}"
        return f"docker://{self.name}:{self.tag or DEFAULT_TAG}"

    def with_digest(self, digest: str) -> Reference:
        if not DIGEST.fullmatch(digest):
            raise ImagePullFailure(f"invalid digest {digest[:80]!r} for {self.canonical()}")
        return dataclasses.replace(self, digest=digest)

    def __str__(self) -> str:
        return self.canonical()


def parse_reference(text: str) -> Reference:
    """``text`` as a Reference, normalised; ImagePullFailure naming it when malformed."""

    def bad(why: str) -> ImagePullFailure:
        return ImagePullFailure(f"invalid image reference {text[:300]!r}: {why}")

    if not text or text != text.strip():
        raise bad("empty or surrounded by spaces")
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not DIGEST.fullmatch(digest):
            raise bad("the digest must be sha256: and 64 lowercase hex digits")
    tag = None
    colon, slash = rest.rfind(":"), rest.rfind("/")
    if colon > slash:  # a colon before the last slash is a registry's port
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG.fullmatch(tag):
            raise bad(f"invalid tag {tag[:140]!r}")
    components = rest.split("/")
    first = components[0]
    if len(components) > 1 and ("." in first or ":" in first or first == "localhost"):
        registry = first
        components = components[1:]
        if not _REGISTRY.fullmatch(registry):
            raise bad(f"invalid registry {registry[:140]!r}")
    else:
        registry = DOCKER_HUB
    if registry == "index.docker.io":
        registry = DOCKER_HUB
    for component in components:
        if not _COMPONENT.fullmatch(component):
            raise bad(f"invalid repository component {component[:140]!r} (lowercase letters, "
                      "digits and . _ - separators only)")
    if registry == DOCKER_HUB and len(components) == 1:
        components = ["library", *components]
    repository = "/".join(components)
    if len(registry) + 1 + len(repository) > MAX_NAME:
        raise bad(f"the name is longer than {MAX_NAME} characters")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry, repository, tag, digest)
