"""Plain-text output shared by the commands: sizes, aligned tables, a bundle's targets and plan."""

from __future__ import annotations


def human(n: float) -> str:
    """Bytes as B / KiB / MiB / GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def table(rows: list[list[str]], header: list[str]) -> str:
    """Left-aligned columns under a header and a dashed rule."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def targets_table(targets: dict) -> str:
    """One row per target: tier, memory plan against the device limit, and why."""
    rows = []
    for name, t in targets.items():
        plan = t.get("memory_plan") or {}
        limit = plan.get("limit_bytes")
        memory = human(plan.get("total_bytes", 0)) + (
            f" / {human(limit)}" if limit is not None else " (no limit)"
        )
        rows.append([name, t["tier"], memory, t.get("reason", "")])
    return table(rows, ["target", "tier", "memory plan", "why"])


def plan_line(plan: dict) -> str:
    """The recorded plan's source and expected padded work, planned vs pow2 vs step ladders."""
    pads = ", ".join(
        f"{name} {plan[name]['work_overhead']:.1%}"
        for name in ("planned", "pow2", "step")
        if name in plan
    )
    return (
        f"plan      {plan.get('trace')} (sha256 {str(plan.get('trace_sha256'))[:12]}, "
        f"{plan.get('trace_requests')} requests, budget {plan.get('max_graphs')} graphs): "
        f"expected padding {pads}"
    )
