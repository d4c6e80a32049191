"""Trust: who reviewed (and how that is known), and when votes are enough to write training data.

Identity, `Reviewer.established`, recorded with every vote and in the provenance:

    token         a personal reviewer token (`serve.inbox.reviewer_tokens_env`, "name:token"
                  pairs): the name is the token's, verified
    token-holder  the service's one bearer token (`serve.auth_token_env`): the name is the one
                  the request gives, claimed by someone holding the shared token
    anonymous     no token configured (`serve.inbox.allow_anonymous_review=true`): name as given
    local         `defectflow review` or Python on the machine holding the inbox: name as given

Policy (`ReviewPolicy`, `serve.inbox.min_reviews` and `trusted_reviewers`): an item is written
into the incoming dataset when `min_reviews` distinct reviewers voted the same label and mask
choice and no vote disagrees, or at once when a trusted reviewer votes, a trusted reviewer being
one named in `trusted_reviewers` whose identity was verified (established by a personal
token): a claimed name is one vote like any other. Until then the item stays pending with its
votes; a reviewer voting again replaces their vote. Votes that disagree mark the item disputed:
it waits for the dissenting reviewers to change their votes, a trusted reviewer, or a discard.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

#: How a reviewer's identity was established, most trusted first.
ESTABLISHED = ("token", "token-holder", "anonymous", "local")
#: A reviewer name: printable, no separator of the token list.
_NAME = re.compile(r"^[^\x00-\x1f:,\s](?:[^\x00-\x1f:,]{0,198}[^\x00-\x1f:,\s])?$")


@dataclass(frozen=True)
class Reviewer:
    name: str
    #: One of ESTABLISHED.
    established: str = "local"

    def __post_init__(self) -> None:
        if self.established not in ESTABLISHED:
            raise ValueError(
                f"unknown identity {self.established!r}: expected one of {', '.join(ESTABLISHED)}"
            )

    @property
    def verified(self) -> bool:
        return self.established == "token"


@dataclass(frozen=True)
class Vote:
    reviewer: str
    established: str
    label: str
    #: none (a good label) | prediction (the predicted mask kept) | upload:<sha256 of the mask>.
    mask: str
    voted_at: float

    @property
    def choice(self) -> tuple[str, str]:
        return (self.label, self.mask)

    def as_dict(self) -> dict:
        return {
            "reviewer": self.reviewer,
            "identity": self.established,
            "label": self.label,
            "mask": self.mask,
            "voted_at": self.voted_at,
        }


@dataclass(frozen=True)
class Decision:
    """Votes that meet the policy: the winning vote (its label and mask) and why."""

    vote: Vote
    #: agreement (min_reviews distinct reviewers) | trusted (a verified trusted reviewer).
    met_by: str


@dataclass(frozen=True)
class ReviewPolicy:
    min_reviews: int = 1
    trusted_reviewers: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if isinstance(self.min_reviews, bool) or int(self.min_reviews) < 1:
            raise ValueError(f"serve.inbox.min_reviews must be >= 1, got {self.min_reviews!r}")
        object.__setattr__(self, "min_reviews", int(self.min_reviews))
        object.__setattr__(
            self, "trusted_reviewers", tuple(str(n).strip() for n in self.trusted_reviewers)
        )

    @classmethod
    def from_config(cls, inbox_cfg) -> ReviewPolicy:
        """From `serve.inbox` (a model's config from before these keys: today's default)."""
        return cls(
            int(getattr(inbox_cfg, "min_reviews", 1)),
            tuple(getattr(inbox_cfg, "trusted_reviewers", None) or ()),
        )

    def trusted(self, vote: Vote) -> bool:
        return vote.established == "token" and vote.reviewer in self.trusted_reviewers

    def decide(self, votes: Iterable[Vote]) -> Decision | None:
        """The decision the votes (one per reviewer) make, or None: the item stays pending."""
        votes = sorted(votes, key=lambda v: v.voted_at)
        trusted = [v for v in votes if self.trusted(v)]
        if trusted:
            return Decision(trusted[-1], "trusted")
        if votes and not disputed(votes) and len({v.reviewer for v in votes}) >= self.min_reviews:
            return Decision(votes[-1], "agreement")
        return None

    def as_dict(self) -> dict:
        return {"min_reviews": self.min_reviews, "trusted_reviewers": list(self.trusted_reviewers)}

    def describe(self) -> str:
        text = (
            "one review writes an item"
            if self.min_reviews == 1
            else f"{self.min_reviews} distinct reviewers must agree (label and mask)"
        )
        if self.trusted_reviewers:
            text += (
                "; one review by a trusted reviewer signed in with their own token is enough ("
                + ", ".join(self.trusted_reviewers)
                + ")"
            )
        return text


def disputed(votes: Iterable[Vote]) -> bool:
    return len({v.choice for v in votes}) > 1


def mask_digest(mask_png: bytes) -> str:
    """The `Vote.mask` of an uploaded mask (its normalized PNG): equal masks agree."""
    return "upload:" + hashlib.sha256(mask_png).hexdigest()[:16]


def _token_name(name: str) -> str:
    """The name of a reviewer token, stripped; ValueError unless 1 to 200 printable characters
    without ':' or ','."""
    name = (name or "").strip()
    if not _NAME.match(name):
        raise ValueError("a reviewer's name is 1 to 200 printable characters, no ':' or ','")
    return name


def parse_reviewer_tokens(text: str | None) -> dict[str, str]:
    """token -> name from "name:token" pairs separated by commas or white space (the value of
    `serve.inbox.reviewer_tokens_env`); {} for None or blank. ValueError for a malformed pair, a
    name twice or a token twice (the message never shows a token)."""
    tokens: dict[str, str] = {}
    for i, pair in enumerate(p for p in re.split(r"[,\s]+", text or "") if p):
        name, sep, token = pair.partition(":")
        if not sep or not token:
            raise ValueError(f"reviewer token {i + 1}: expected name:token")
        try:
            name = _token_name(name)
        except ValueError as exc:
            raise ValueError(f"reviewer token {i + 1}: {exc}") from None
        if name in tokens.values():
            raise ValueError(f"reviewer {name!r} has more than one token")
        if token in tokens:
            raise ValueError(f"reviewer token {i + 1} is also the token of another reviewer")
        tokens[token] = name
    return tokens


def votes_from_rows(rows: Iterable[Mapping]) -> list[Vote]:
    return [
        Vote(r["reviewer"], r["identity"], r["label"], r["mask_choice"], r["voted_at"])
        for r in rows
    ]
