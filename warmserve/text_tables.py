"""Plain-text tables for the CLI's output."""

from __future__ import annotations


def format_table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[str(value) for value in row] for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]
    return "\n".join(
        "  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def format_bytes(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    value = count / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def describe_progress(done: int, total: int, seconds: float) -> str:
    """A load's bytes so far, after `seconds`: "1.2 GiB of 2.4 GiB (50%), 1.1 GiB/s, ETA 1 s"."""
    percent = 100 * done / total if total else 100.0
    line = f"{format_bytes(done)} of {format_bytes(total)} ({percent:.0f}%)"
    if seconds > 0 and done > 0:
        rate = done / seconds
        line += f", {format_bytes(int(rate))}/s, ETA {max(0.0, (total - done) / rate):.0f} s"
    return line
