"""What the diagnosis reports: a `Finding` (one problem, where and since when, the
evidence and the advice) and `Findings`, the list `diagnose` returns."""

import dataclasses

SEVERITIES = ("info", "warning", "error")


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem found: what (code), how bad (severity), where (layer, may be None),
    when (step: where it shows; since: the step it began, may be None), the numbers
    behind it (evidence, and `numbers` for scripts), what to try (advice), and the
    finding that explains it (`caused_by`: the code of a problem that began before it
    and leads to it, e.g. loss spikes before a layer died)."""

    code: str
    severity: str
    layer: str | None
    step: int | None
    evidence: str
    advice: str
    since: int | None = None
    caused_by: str | None = None
    numbers: dict = dataclasses.field(default_factory=dict, compare=False)

    def __str__(self):
        where = f" [{self.layer}]" if self.layer else ""
        when = f" at step {self.step}" if self.step is not None else ""
        began = f" since step {self.since}" if self.since is not None else ""
        cause = f" (caused by {self.caused_by})" if self.caused_by else ""
        return (f"{self.severity.upper()} {self.code}{where}{when}{began}{cause}: "
                f"{self.evidence}. {self.advice}")

    def as_dict(self):
        """The finding as a JSON-ready dict (`optinsight diagnose --format json`)."""
        return dataclasses.asdict(self)

    def _repr_html_(self):
        from optinsight.report.notebook import findings_html

        return findings_html([self])


class Findings(list):
    """The diagnosis' findings, first cause first: a list that shows as a table in a
    notebook."""

    def _repr_html_(self):
        from optinsight.report.notebook import findings_html

        return findings_html(self)
