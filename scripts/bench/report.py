"""The table: each workload's median seconds per implementation, pyunion's ratios to
fuse-overlayfs, the kernel and unionfs-fuse, their geometric means, and the daemons'
peak RSS and CPU time. Text for the terminal, markdown for the README."""

from __future__ import annotations

import math
import statistics
from typing import Any

from .impls import ORDER
from .sizes import PRESETS, Sizes
from .workloads import BY_ID, title

RATIOS = [
    ("fuse-overlayfs", "py/fo"),
    ("kernel", "py/kernel"),
    ("unionfs-fuse", "py/unionfs"),
    ("pyunion-nospin", "spin on/off"),
    ("pyunion-base", "py/base"),
]
GOAL_MAX_RATIO = 1.2


def fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1000:
        return f"{x:.0f}"
    return f"{x:.3g}" if x >= 0.001 else f"{x:.2g}"


def medians(data: dict[str, Any]) -> dict[tuple[str, str], dict[str, float | str]]:
    """(workload, mode) -> impl -> median seconds, or "ERR" if every repetition failed."""
    cells: dict[tuple[str, str], dict[str, list[float]]] = {}
    errors: dict[tuple[str, str], set[str]] = {}
    for r in data["results"]:
        key = (r["workload"], r["mode"])
        cells.setdefault(key, {}).setdefault(r["impl"], [])
        if r["seconds"] is not None:
            cells[key][r["impl"]].append(r["seconds"])
        else:
            errors.setdefault(key, set()).add(r["impl"])
    out: dict[tuple[str, str], dict[str, float | str]] = {}
    for key, per in cells.items():
        out[key] = {impl: statistics.median(v) if v else "ERR" for impl, v in per.items()}
    return out


def _row_order(data: dict[str, Any]) -> list[tuple[str, str]]:
    present = {(r["workload"], r["mode"]) for r in data["results"]}
    order = [*list(BY_ID), "mount"]
    modes = data["meta"].get("modes", ["cold", "warm"])
    return [(w, m) for w in order for m in modes if (w, m) in present]


def _label(wid: str, mode: str, sizes: Sizes, meta: dict[str, Any]) -> str:
    if wid == "mount":
        return f"mount, {meta.get('stack_files', sizes.stack_files):,} files ({mode})"
    return f"{title(wid, sizes)} ({mode})"


def build_rows(data: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str]]:
    meta = data["meta"]
    sizes = PRESETS[meta["sizes"]["name"]].with_(**meta["sizes"])
    impls = [i for i in ORDER if i in meta["impls"]]
    ratio_cols = [(base, label) for base, label in RATIOS if "pyunion" in impls and base in impls]
    header = ["workload (median s)"] + impls + [label for _, label in ratio_cols]
    rows: list[list[str]] = []
    med = medians(data)
    logs: dict[str, list[float]] = {label: [] for _, label in ratio_cols}
    over: list[str] = []
    for wid, mode in _row_order(data):
        per = med[(wid, mode)]
        row = [_label(wid, mode, sizes, meta)]
        for impl in impls:
            v = per.get(impl)
            row.append(v if isinstance(v, str) else fmt_s(v))
        py = per.get("pyunion")
        for base, label in ratio_cols:
            b = per.get(base)
            if isinstance(py, float) and isinstance(b, float) and py > 0 and b > 0:
                r = py / b
                logs[label].append(math.log(r))
                mark = " !" if base == "fuse-overlayfs" and r > GOAL_MAX_RATIO else ""
                if base == "unionfs-fuse" and r >= 1.0:
                    mark = " !"
                row.append(f"{r:.2f}{mark}")
                if mark and base == "fuse-overlayfs":
                    over.append(row[0])
            else:
                row.append("-")
        rows.append(row)
    if ratio_cols:
        gm = ["geometric mean of pyunion's ratios"] + [""] * len(impls)
        for _, label in ratio_cols:
            gm.append(
                f"{math.exp(sum(logs[label]) / len(logs[label])):.2f}" if logs[label] else "-"
            )
        rows.append(gm)
    # daemon rows
    peak: dict[str, float] = {}
    for r in data["results"]:
        if r.get("rss_peak_mib") is not None:
            peak[r["impl"]] = max(peak.get(r["impl"], 0.0), r["rss_peak_mib"])
    for impl, s in data.get("session", {}).items():
        if s.get("rss_peak_mib") is not None:
            peak[impl] = max(peak.get(impl, 0.0), s["rss_peak_mib"])
    if peak:
        rows.append(
            ["daemon peak RSS, MiB (VmHWM)"]
            + [f"{peak[i]:.1f}" if i in peak else "-" for i in impls]
            + [""] * len(ratio_cols)
        )
    pss: dict[str, float] = {}
    for r in data["results"]:
        if r.get("pss_mib") is not None:
            pss[r["impl"]] = max(pss.get(r["impl"], 0.0), r["pss_mib"])
    for impl, s in data.get("session", {}).items():
        if s.get("pss_mib") is not None:
            pss[impl] = max(pss.get(impl, 0.0), s["pss_mib"])
    if pss:
        rows.append(
            ["daemon PSS after a workload, MiB (highest)"]
            + [f"{pss[i]:.1f}" if i in pss else "-" for i in impls]
            + [""] * len(ratio_cols)
        )
    sess = data.get("session", {})
    if any("cpu_s" in s for s in sess.values()):
        rows.append(
            ["daemon CPU s, one pass of all workloads"]
            + [f"{sess[i]['cpu_s']:.2f}" if "cpu_s" in sess.get(i, {}) else "-" for i in impls]
            + [""] * len(ratio_cols)
        )
    notes = []
    failed: dict[tuple[str, str, str], str] = {}
    for r in data["results"]:
        if r["error"]:
            msg = r["error"]
            if ": exit " in msg:  # "COMMAND: exit N: STDERR": the command line says little
                msg = "exit " + msg.split(": exit ", 1)[1]
            failed.setdefault(
                (r["impl"], r["workload"], r["mode"]), msg.strip().splitlines()[0][:160]
            )
    for (impl, wid, mode), err in sorted(failed.items()):
        notes.append(f"failed: {impl} {wid} ({mode}): {err}")
    if over:
        notes.append(f"pyunion over {GOAL_MAX_RATIO:.1f}x fuse-overlayfs: " + "; ".join(over))
    return header, rows, notes


def _describe(meta: dict[str, Any]) -> list[str]:
    m = meta["machine"]
    img = meta["image"]
    layers = ", ".join(
        f"l{i}: {c['files']} files, {c['whiteouts']} whiteouts, "
        f"{c['opaque']} opaque, {c['bytes'] / (1 << 20):.0f} MiB"
        for i, c in enumerate(img["counts"])
    )
    lines = [
        (
            f"Date: {meta['date']}. Machine: {m['cpu']}, {m['cpus']} CPUs, "
            f"{m['mem_gib']:.0f} GiB RAM, {m['kernel']}, layers and uppers on {m['fs']}."
        ),
        (
            f"Run: {meta['sizes']['name']}, {meta['reps']} repetition(s), "
            f"modes {', '.join(meta['modes'])}; every measurement on a fresh mount with a fresh "
            f"upper (native: a fresh hard-linked copy of the merged tree); cold = after "
            f"`sync; echo 3 > /proc/sys/vm/drop_caches`; warm = after the warm-up (for the "
            f"workloads that write: after `sync; echo 1 > /proc/sys/vm/drop_caches`, then the "
            f"warm-up) and `sync`; medians."
        ),
        (
            f"Image: {img['source']} in 3 layers (top first: {layers}); kernel-format whiteouts "
            f"and opaque directories for kernel, fuse-overlayfs and pyunion; unionfs-fuse "
            f"(`-o cow,hide_meta_files`) gets the same layers with its own "
            f"`.unionfs-fuse/*_HIDDEN~` whiteouts."
        ),
        "Versions: " + "; ".join(f"{k}: {v}" for k, v in meta["versions"].items() if v) + ".",
        (
            "Ratios are pyunion's time over the other's (below 1 = pyunion faster); `!` marks "
            "a ratio over the goal (over 1.2 vs fuse-overlayfs, 1.0 or more vs unionfs-fuse); "
            "spin on/off is pyunion over pyunion with `-o spin=0`, in the same run."
        ),
    ]
    if meta.get("skipped"):
        lines.append("Not run: " + "; ".join(f"{k} ({v})" for k, v in meta["skipped"].items()))
    return lines


def render(data: dict[str, Any], markdown: bool = False) -> str:
    header, rows, notes = build_rows(data)
    desc = _describe(data["meta"])
    out: list[str] = []
    if markdown:
        for d in desc:
            out += [d, ""]

        def cells(r: list[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in r) + " |"

        out.append(cells(header))
        out.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        out += [cells(r) for r in rows]
        if notes:
            out += [""] + [f"- {n}" for n in notes]
    else:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def line(r: list[str]) -> str:
            return "  ".join(
                c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)
            )

        out.append(line(header))
        out.append("  ".join("-" * w for w in widths))
        out += [line(r) for r in rows]
        out += ["", *notes, *desc]
    if data.get("build"):
        from .build import render_build

        out += ["", render_build(data["build"], markdown)]
    if data.get("containers"):
        from .containers import render_containers

        out += ["", render_containers(data["containers"], markdown)]
    return "\n".join(out).rstrip() + "\n"
