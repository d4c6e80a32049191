"""The review inbox: images the model was uncertain about, kept for a person to label.

One job a module:

    store.py      the sqlite index and item files: add (atomic, never raises), list, get, stats
    retention.py  the limits (refuse when full, never evict) and removing crashed writes' leftovers
    review.py     `Inbox` = the store + review (votes, label and mask checks), discard and view
    trust.py      who reviewed and how that is known, and when votes are enough (`ReviewPolicy`)
    export.py     a reviewed item into the MVTec-layout incoming dataset, and its provenance
    writer.py     `InboxWriter`: adds from a background thread with a bounded queue
    errors.py     `InboxError` and its kinds, with their HTTP status

No HTTP here: service.py and `defectflow.serving.web.review` serve it, `defectflow review` (the
CLI) runs it in a terminal.

May import: `defectflow.inference` (decoding, overlays), `defectflow.serving.uploads` (the
checks a reviewer's mask upload passes), `defectflow.files`, numpy and OpenCV. It is in the
Bento (bentofile.yaml includes serving/inbox/*.py), so never data, training or evaluation.
"""

from defectflow.serving.inbox.errors import InboxError, InvalidReview, ItemNotFound, ItemNotPending
from defectflow.serving.inbox.export import PROVENANCE_FILE, read_provenance
from defectflow.serving.inbox.retention import TEMP_MAX_AGE_S
from defectflow.serving.inbox.review import MAX_MASK_BYTES, Inbox, ReviewResult
from defectflow.serving.inbox.store import (
    BUSY_TIMEOUT_MS,
    INDEX_FILE,
    ITEMS_DIR,
    STATES,
    AddResult,
    InboxStore,
)
from defectflow.serving.inbox.trust import (
    ESTABLISHED,
    Reviewer,
    ReviewPolicy,
    parse_reviewer_tokens,
)
from defectflow.serving.inbox.writer import InboxWriter

__all__ = [
    "BUSY_TIMEOUT_MS",
    "ESTABLISHED",
    "INDEX_FILE",
    "ITEMS_DIR",
    "MAX_MASK_BYTES",
    "PROVENANCE_FILE",
    "STATES",
    "TEMP_MAX_AGE_S",
    "AddResult",
    "Inbox",
    "InboxError",
    "InboxStore",
    "InboxWriter",
    "InvalidReview",
    "ItemNotFound",
    "ItemNotPending",
    "ReviewPolicy",
    "ReviewResult",
    "Reviewer",
    "parse_reviewer_tokens",
    "read_provenance",
]
