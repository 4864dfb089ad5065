"""The report every provisioning command prints: one line per object, then the counts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from provisioning.upgrade import UpgradeReport

OUTCOMES = ("created", "updated", "unchanged", "failed")
PLANNED_SHOWN = 20  # a dry run lists this many planned agent upgrades, then counts the rest


@dataclass
class Summary:
    dry_run: bool = False
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)  # kind, name, outcome, detail
    agents: "UpgradeReport | None" = None  # the viewer agents brought to the current template

    def add(self, kind: str, name: str, outcome: str, detail: str = "") -> None:
        assert outcome in OUTCOMES, outcome
        self.rows.append((kind, name, outcome, detail))

    @property
    def counts(self) -> Counter:
        return Counter(outcome for _, _, outcome, _ in self.rows)

    @property
    def agent_counts(self) -> Counter:
        return self.agents.counts if self.agents is not None else Counter()

    @property
    def ok(self) -> bool:
        return self.counts["failed"] == 0 and self.agent_counts["failed"] == 0

    def render(self) -> str:
        verb = {"created": "would create", "updated": "would update"} if self.dry_run else {}
        lines = []
        for kind, name, outcome, detail in self.rows:
            shown = verb.get(outcome, outcome)
            lines.append(f"  {kind:<7} {name:<24} {shown:<13} {detail}".rstrip())
        if self.agents is not None:
            for viewer, changed in self.agents.planned[:PLANNED_SHOWN]:
                lines.append(f"  {'agent':<7} {viewer:<24} {'would upgrade':<13} {'; '.join(changed)}")
            if len(self.agents.planned) > PLANNED_SHOWN:
                lines.append(f"  ... and {len(self.agents.planned) - PLANNED_SHOWN} more agents to upgrade")
            for viewer, reason in self.agents.failures:
                lines.append(f"  {'agent':<7} {viewer:<24} {'failed':<13} {reason}")
        counts = self.counts
        total = ", ".join(f"{counts[o]} {o}" for o in OUTCOMES)
        if self.agents is not None:
            a = self.agents.counts
            fields = ", ".join(f"{name} {n}" for name, n in sorted(self.agents.changed_fields.items()))
            total += (f"; {a['upgraded']} agents {'to upgrade' if self.dry_run else 'upgraded'}"
                      f" / {a['current']} already current / {a['failed']} failed" + (f" ({fields})" if fields else ""))
        lines.append(("dry run, nothing sent: " if self.dry_run else "") + total)
        return "\n".join(lines)
