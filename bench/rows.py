"""The row every benchmark reports, the section that groups them, and the plain-text table
`make bench` prints from them (bench.report writes the Markdown report)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Row:
    """One measured figure next to its baseline from the same run and its target. A figure
    taken over several runs (seeds) gives its median as `value` and (min, max) as
    `spread`; its baseline likewise."""

    name: str
    value: float | None
    unit: str
    baseline: str = ""
    baseline_value: float | None = None
    target: str = ""
    ok: bool | None = None  # None: informative, no target
    spread: tuple[float, float] | None = None
    baseline_spread: tuple[float, float] | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Section:
    """What one benchmark gives the report: its rows, notes saying how they were measured
    (the baselines' modelling choices among them) and details (preformatted tables)."""

    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: list[tuple[str, str]] = field(default_factory=list)  # (caption, text)

    def extend(self, other: Section) -> Section:
        self.rows += other.rows
        self.notes += other.notes
        self.details += other.details
        return self


def fmt(value: float | None, unit: str = "", spread: tuple[float, float] | list | None = None
        ) -> str:
    """`value unit`, with `(min-max)` after it when the figure has a spread."""
    if value is None:
        return "-"
    text = _num(value)
    if spread is not None:
        text += f" ({_num(spread[0])}-{_num(spread[1])})"
    return f"{text} {unit}".strip()


def _num(value: float) -> str:
    if isinstance(value, float) and not value.is_integer():
        if abs(value) < 0.1:
            return f"{value:.2g}"  # small figures keep two significant digits, never 0.00
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{int(value):,}"


def cells(r: dict) -> tuple[str, str, str, str, str]:
    """A row as the five cells of either table: figure, value, baseline, target, met."""
    unit = r.get("unit", "")
    base = r.get("baseline") or ""
    if r.get("baseline_value") is not None:
        number = fmt(r["baseline_value"], unit, r.get("baseline_spread"))
        base = f"{base}: {number}" if base else number
    ok = r.get("ok")
    return (str(r["name"]), fmt(r.get("value"), unit, r.get("spread")), base,
            str(r.get("target") or ""), "-" if ok is None else ("yes" if ok else "NO"))


def render(title: str, rows: list[dict]) -> str:
    """A plain-text table: figure, value, baseline (same run), target, ok."""
    head = ("figure", "value", "baseline (same run)", "target", "ok")
    rows_ = [head, *(cells(r) for r in rows)]
    widths = [max(len(row[i]) for row in rows_) for i in range(len(head))]
    lines = [f"== {title} =="]
    for k, row in enumerate(rows_):
        lines.append("  ".join(c.ljust(w) if i in (0, 2, 3) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if k == 0:
            lines.append("-" * len(lines[-1]))
    return "\n".join(lines)
