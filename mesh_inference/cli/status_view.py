"""Human-readable rendering of ``/api/status`` for ``mesh-inference status``."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 30):.1f} GB"


def render_status(data: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    node, plan, engine = data["node"], data["plan"], data["engine"]
    ready = "[green]ready[/]" if data.get("ready") else f"[yellow]{engine.get('state')}[/]"
    model = (data.get("model") or {}).get("name") or "-"
    console.print(f"[bold]mesh[/] {data.get('mesh_id')}  model [bold]{model}[/]  engine {ready}")
    if plan.get("state") == "waiting":
        console.print(f"[yellow]waiting for capacity:[/] {plan.get('reason')}")
    elif plan.get("state") == "none" and plan.get("reason"):
        console.print(f"[dim]{plan.get('reason')}[/]")
    table = Table(show_header=True, header_style="bold")
    for col in ("node", "name", "role", "status", "memory", "share", "rtt", "last seen"):
        table.add_column(col)
    rows = [{**node, "status": "self", "rtt_ms": None, "last_seen_s": None}, *data["peers"]]
    for row in rows:
        share = row.get("share")
        rtt = row.get("rtt_ms")
        seen = row.get("last_seen_s")
        role = row["role"]
        table.add_row(
            row["id"][:8],
            row.get("name", ""),
            f"[bold magenta]{role}[/]" if role == "host" else role,
            row.get("status", "") + (" [yellow]quarantined[/]" if row.get("quarantine") else ""),
            _gb(row.get("memory_bytes")),
            "-" if share is None else f"{share * 100:.0f}%",
            "-" if rtt is None else f"{rtt:.1f} ms",
            "-" if seen is None else f"{seen:.1f} s",
        )
    console.print(table)
    for row in data["peers"]:
        if row.get("quarantine"):
            console.print(f"[yellow]{row['id'][:8]} quarantined:[/] {row['quarantine']['reason']}")
