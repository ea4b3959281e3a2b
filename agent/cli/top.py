"""``jouleward top``: a live terminal view of the running agent, in the spirit of htop.

Reads the agent's HTTP API once a second: node power by domain and source,
the grid carbon intensity, and the jobs sorted by power. Keys change the sort
and ``q`` quits. When standard output is not a terminal it prints one plain
snapshot instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.cli.reader import AgentAnswer, AgentNotRunning, AgentReader

SORTS: dict[str, tuple[str, Callable[[dict[str, Any]], Any]]] = {
    "p": ("power", lambda job: -sum(job.get("power_w", {}).values())),
    "e": ("energy", lambda job: -sum(job.get("energy_j", {}).values())),
    "c": ("emissions", lambda job: -(job.get("emissions_g") or 0.0)),
    "g": ("gpu", lambda job: -job.get("power_w", {}).get("gpu", 0.0)),
    "n": ("name", lambda job: (job.get("name", ""), job.get("id", ""))),
}
HELP = "sort: [p]ower [e]nergy [c]o2 [g]pu [n]ame   [a]ll/running   [q]uit"


@dataclass
class ViewState:
    sort: str = "p"
    show_finished: bool = False


def energy_text(joules: float) -> str:
    for unit, size in (("MJ", 1e6), ("kJ", 1e3)):
        if joules >= size:
            return f"{joules / size:.2f} {unit}"
    return f"{joules:.1f} J"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "~"


def render_lines(node: dict[str, Any], jobs: list[dict[str, Any]], state: ViewState, width: int = 120) -> list[str]:
    devices = node.get("devices", [])
    # platform and board overlap cpu/dram/gpu: the node figure sums the attributed domains only.
    attributed = [d for d in devices if d["domain"] in ("cpu", "dram", "gpu")]
    by_domain: dict[str, float] = {}
    for device in attributed:
        by_domain[device["domain"]] = by_domain.get(device["domain"], 0.0) + device["power_w"]
    gpu_power_w = by_domain.get("gpu", 0.0)
    stamp = time.strftime("%H:%M:%S", time.localtime(node.get("timestamp") or time.time()))
    lines = [
        f"jouleward top  {stamp}   sort: {SORTS[state.sort][0]}   {'all jobs' if state.show_finished else 'running jobs'}",
        f"node {sum(by_domain.values()):8.1f} W   "
        + "  ".join(f"{domain} {watts:.1f} W" for domain, watts in sorted(by_domain.items()))
        + f"   cpu busy {100.0 * node.get('cpu_utilization_ratio', 0.0):.0f}%",
    ]
    for device in devices:
        lines.append(
            f"  {device['domain']:<9}{device['device']:<14}{device['source']:<12}{device['power_w']:9.1f} W"
            f"{energy_text(device['energy_j']):>14}"
        )
    carbon = node.get("carbon")
    if carbon:
        lines.append(
            f"carbon {carbon['grams_per_kwh']:.1f} gCO2eq/kWh  zone {carbon['zone'] or '-'}  "
            f"source {carbon['source']}  pue {carbon['pue']:.2f}  node {carbon['emissions_g']:.3f} g"
            f"  provider errors {carbon['provider_errors']}"
        )
    lines.append("")
    lines.append(
        f"{'JOB ID':<22}{'NAME':<22}{'KIND':<11}{'POWER W':>9}{'ENERGY':>12}{'CO2 g':>11}"
        f"{'GPU %':>7}{'GPU IDLE':>11}  STATE"
    )
    shown = [job for job in jobs if state.show_finished or job.get("running", True)]
    for job in sorted(shown, key=SORTS[state.sort][1]):
        power = sum(job.get("power_w", {}).values())
        gpu_share = f"{100.0 * job['power_w'].get('gpu', 0.0) / gpu_power_w:.0f}" if gpu_power_w > 0 else "-"
        idle = job.get("gpu_idle_j")
        lines.append(
            f"{_clip(job['id'], 21):<22}{_clip(job['name'], 21):<22}{job['kind']:<11}{power:9.1f}"
            f"{energy_text(sum(job.get('energy_j', {}).values())):>12}{job.get('emissions_g', 0.0):11.3f}"
            f"{gpu_share:>7}{energy_text(idle) if idle else '-':>11}  {'running' if job.get('running', True) else 'finished'}"
        )
    if not shown:
        lines.append("(no jobs)")
    return [_clip(line, width) for line in lines]


def snapshot(reader: AgentReader) -> str:
    return "\n".join(render_lines(reader.node(), reader.jobs(), ViewState(), width=10_000)) + "\n"


def run_curses(reader: AgentReader, interval_s: float = 1.0) -> None:
    import curses

    def loop(screen: Any) -> None:
        curses.curs_set(0)
        screen.timeout(100)
        state = ViewState()
        lines: list[str] = []
        next_fetch = 0.0
        while True:
            now = time.monotonic()
            redraw = False
            if now >= next_fetch:
                try:
                    lines = render_lines(reader.node(), reader.jobs(), state, width=10_000)
                except (AgentNotRunning, AgentAnswer) as exc:
                    lines = [f"jouleward top: {exc}", "retrying every second"]
                next_fetch = now + interval_s
                redraw = True
            key = screen.getch()
            if key in (ord("q"), ord("Q"), 27):
                return
            if key != -1:
                char = chr(key) if 0 <= key < 256 else ""
                if char in SORTS:
                    state.sort, next_fetch = char, 0.0
                elif char == "a":
                    state.show_finished, next_fetch = not state.show_finished, 0.0
            if redraw:
                height, width = screen.getmaxyx()
                screen.erase()
                for row, line in enumerate(lines[: height - 1]):
                    screen.addnstr(row, 0, line, width - 1, curses.A_BOLD if row == 0 else 0)
                screen.addnstr(height - 1, 0, HELP, width - 1, curses.A_REVERSE)
                screen.refresh()

    curses.wrapper(loop)


def command(args: argparse.Namespace) -> int:
    """``jouleward top``: the live view, or one snapshot."""
    from agent.cli.common import EXIT_USAGE, config_from_args
    from agent.cli.reader import AgentAnswer, AgentNotRunning, AgentReader

    config = config_from_args(args)
    reader = AgentReader(
        config.listen, timeout_s=min(2.0, max(config.interval_s, 0.5)), control_sockets=config.control_socket_candidates
    )
    if args.once or not (sys.stdout.isatty() and sys.stdin.isatty()):
        try:
            sys.stdout.write(snapshot(reader))
        except (AgentNotRunning, AgentAnswer) as exc:
            print(f"jouleward: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        return 0
    run_curses(reader, interval_s=1.0)
    return 0
