"""What the data scan reports: `Issue` (one report line) and `DatasetError` (why a sample cannot be used).

Every file the scan looks at ends in exactly one place: a sample, or an `Issue` with action "skipped" and a reason
code. Samples that needed a conversion (rotation, EXIF orientation, 10-bit or 4:4:4 video, variable frame rate) are used
and also get an `Issue` with action "used", so the report never hides them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


class DatasetError(Exception):
    """A sample (or a whole dataset's captions) cannot be used; `reason` is the report code."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(detail)


@dataclass
class Issue:
    """One report line: a skipped sample (action "skipped") or a used one that needed a conversion ("used")."""

    dataset: str
    source: str
    action: str
    reason: str
    detail: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)


_NOTICE_CODES = (
    ("-bit", "high_bit_depth"),
    ("4:2:0", "chroma_converted"),
    ("rotation", "rotated"),
    ("variable frame rate", "variable_frame_rate"),
)


def notice_issue(ds_id: str, path: Path, notices: tuple[str, ...] | list[str]) -> Issue | None:
    if not notices:
        return None
    codes: list[str] = []
    for text in notices:
        code = next((c for key, c in _NOTICE_CODES if key in text), "converted")
        if code not in codes:
            codes.append(code)
    return Issue(ds_id, str(path), "used", ",".join(codes), "; ".join(notices))
