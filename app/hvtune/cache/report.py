"""What a build tells the user: `cache_report.jsonl` (every skipped or converted sample and why) and the summary
`hvtune cache` prints (samples found and used, skip reasons, buckets, hits and misses, bytes written)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from hvtune.cache.store import CacheError
from hvtune.data.datasets import ScanResult
from hvtune.files import write_text_atomic


@dataclass
class CacheSummary:
    found: dict[str, int]
    used: dict[str, int]
    skipped: dict[str, int]  # reason -> count
    converted: dict[str, int]  # reason -> count of used samples that needed a conversion
    buckets: dict[tuple[int, int, int], int]  # bucket -> samples (before repeats)
    bucket_draws: dict[tuple[int, int, int], int]  # bucket -> samples per epoch (after repeats)
    hits: dict[str, int]
    misses: dict[str, int]
    bytes_written: int
    seconds: float
    report_path: Path
    manifest_path: Path
    batch_size: int = 1

    @property
    def total_found(self) -> int:
        return sum(self.found.values())

    @property
    def total_used(self) -> int:
        return sum(self.used.values())

    def format(self) -> str:
        lines = [
            f"cache: {self.total_found} file(s) found, {self.total_used} used, {sum(self.skipped.values())} skipped"
        ]
        for ds in self.found:
            lines.append(f"  {ds}: {self.found[ds]} found, {self.used.get(ds, 0)} used")
        if self.skipped:
            lines.append("skipped by reason:")
            lines += [f"  {reason:<24} {n}" for reason, n in sorted(self.skipped.items())]
        if self.converted:
            lines.append("used after a conversion:")
            lines += [f"  {reason:<24} {n}" for reason, n in sorted(self.converted.items())]
        lines.append(f"  {'bucket WxH@F':<16} {'samples':>8} {'per epoch':>10} {f'batches of {self.batch_size}':>12}")
        for (w, h, f), n in sorted(self.buckets.items()):
            draws = self.bucket_draws[(w, h, f)]
            lines.append(f"  {f'{w}x{h}@{f}':<16} {n:>8} {draws:>10} {draws // self.batch_size:>12}")
        lines.append("  (per epoch: with repeats; a bucket's incomplete last batch is dropped)")
        lines.append("cache hits / misses:")
        for name in self.hits:
            lines.append(f"  {name:<10} {self.hits[name]:>6} hit  {self.misses[name]:>6} encoded")
        lines.append(f"written: {self.bytes_written / 1e6:.2f} MB in {self.seconds:.1f} s")
        lines.append(f"report: {self.report_path}")
        lines.append(f"manifest: {self.manifest_path}")
        return "\n".join(lines)


class BuildCounts:
    """A build's hits and misses per entry kind, and the bytes it wrote."""

    def __init__(self, names: list[str]):
        self.hits = dict.fromkeys(names, 0)
        self.misses = dict.fromkeys(names, 0)
        self.bytes = 0


def write_report(result: ScanResult, report: Path, *, write: bool = True) -> int:
    """`cache_report.jsonl`: every skipped or converted sample and why; the bytes written. Raises when a dataset has
    nothing usable (also when `write` is false: a sharded build's other processes, whose main process writes it)."""
    lines = "".join(json.dumps(i.to_json(), ensure_ascii=False) + "\n" for i in result.issues)
    nbytes = write_text_atomic(report, lines) if write else 0  # SHARD HOOK
    if result.empty_datasets():
        raise _empty_error(result, report)
    return nbytes


def _empty_error(result: ScanResult, report: Path) -> CacheError:
    parts = []
    for ds in result.empty_datasets():
        reasons = Counter(i.reason for i in result.skipped if i.dataset == ds)
        why = ", ".join(f"{r} x{n}" for r, n in reasons.most_common()) or "no video or image files"
        parts.append(f"{ds} ({result.found.get(ds, 0)} file(s) found; skipped: {why})")
    return CacheError(f"dataset(s) with nothing usable: {'; '.join(parts)}. Every skipped file and why: {report}")


def summarize(
    result: ScanResult, counts: BuildCounts, batch_size: int, report: Path, manifest: Path, seconds: float
) -> CacheSummary:
    """What `hvtune cache` prints, from the scan result (less the samples dropped) and the build's counts."""
    buckets: Counter = Counter()
    draws: Counter = Counter()
    for s in result.samples:
        buckets[s.bucket] += 1
        draws[s.bucket] += s.repeats + 1
    return CacheSummary(
        found=dict(result.found),
        used=dict(result.used_by_dataset()),
        skipped=dict(result.skipped_by_reason()),
        converted=dict(Counter(i.reason for i in result.issues if i.action == "used")),
        buckets=dict(buckets),
        bucket_draws=dict(draws),
        hits=counts.hits,
        misses=counts.misses,
        bytes_written=counts.bytes,
        seconds=seconds,
        report_path=report,
        manifest_path=manifest,
        batch_size=batch_size,
    )
