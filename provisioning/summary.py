"""The report every provisioning command prints: one line per object, then the counts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

OUTCOMES = ("created", "updated", "unchanged", "failed")


@dataclass
class Summary:
    dry_run: bool = False
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)  # kind, name, outcome, detail

    def add(self, kind: str, name: str, outcome: str, detail: str = "") -> None:
        assert outcome in OUTCOMES, outcome
        self.rows.append((kind, name, outcome, detail))

    @property
    def counts(self) -> Counter:
        return Counter(outcome for _, _, outcome, _ in self.rows)

    @property
    def ok(self) -> bool:
        return self.counts["failed"] == 0

    def render(self) -> str:
        verb = {"created": "would create", "updated": "would update"} if self.dry_run else {}
        lines = []
        for kind, name, outcome, detail in self.rows:
            shown = verb.get(outcome, outcome)
            lines.append(f"  {kind:<7} {name:<24} {shown:<13} {detail}".rstrip())
        counts = self.counts
        total = ", ".join(f"{counts[o]} {o}" for o in OUTCOMES)
        lines.append(("dry run, nothing sent: " if self.dry_run else "") + total)
        return "\n".join(lines)
