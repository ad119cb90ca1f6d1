"""The row every benchmark reports, and the table `make bench` prints from them."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Row:
    """One measured figure next to its baseline from the same run and its target."""

    name: str
    value: float | None
    unit: str
    baseline: str = ""
    baseline_value: float | None = None
    target: str = ""
    ok: bool | None = None  # None: informative, no target

    def as_dict(self) -> dict:
        return asdict(self)


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        text = f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    else:
        text = f"{int(value):,}"
    return f"{text} {unit}".strip()


def render(title: str, rows: list[dict]) -> str:
    """A plain-text table: figure, value, baseline (same run), target, ok."""
    head = ("figure", "value", "baseline (same run)", "target", "ok")
    body = []
    for r in rows:
        base = r.get("baseline") or ""
        if r.get("baseline_value") is not None:
            base = f"{base}: {fmt(r['baseline_value'], r.get('unit', ''))}" if base else fmt(
                r["baseline_value"], r.get("unit", ""))
        ok = r.get("ok")
        body.append((str(r["name"]), fmt(r.get("value"), r.get("unit", "")), base,
                     str(r.get("target") or ""), "-" if ok is None else ("yes" if ok else "NO")))
    rows_ = [head, *body]
    widths = [max(len(row[i]) for row in rows_) for i in range(len(head))]
    lines = [f"== {title} =="]
    for k, row in enumerate(rows_):
        lines.append("  ".join(c.ljust(w) if i in (0, 2, 3) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if k == 0:
            lines.append("-" * len(lines[-1]))
    return "\n".join(lines)
