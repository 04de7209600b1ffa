"""`ltune check` shown as text lines, JSON, JUnit XML or GitHub workflow annotations. Builds; never prints.

Every string that comes from the user (a path, an error quoting a value) is made printable first:
control, format and line-separator characters and lone surrogates become backslash escapes, so
no output gets an extra line, an injected workflow command or a character XML 1.0 forbids.
"""

from __future__ import annotations

import unicodedata
import xml.etree.ElementTree as ET

from rich.markup import escape
from rich.table import Table

from .planner.check import CheckReport, TargetCheck
from .profiles import GIB
from .render import breakdown_table, gib, layout_line

_UNPRINTABLE = {"Cc", "Cs", "Cf", "Zl", "Zp"}


def printable(text: str) -> str:
    """`text` on one line: unprintable characters as \\n, \\x1b, \\u202e, \\udc80 escapes."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if unicodedata.category(ch) in _UNPRINTABLE or ch in "\ufffe\uffff":
            out.append(ch.encode("unicode_escape", "backslashreplace").decode("ascii")
                       if ch.isascii() else f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    return "".join(out)


def _where(c: TargetCheck) -> str:
    return printable(c.path) + (f" on {c.target}" if c.target else "")


def _pct(value: float) -> str:
    return f"{value:+.1f}%"


def fit_line(c: TargetCheck) -> str:
    """`GIB of GIB GiB usable, headroom GIB GiB (PCT)` (and host memory when it does not fit)."""
    mem = c.memory
    text = (f"{gib(mem.total_bytes)} of {gib(mem.usable_bytes)} GiB usable, headroom "
            f"{c.headroom_bytes / GIB:,.2f} GiB ({c.headroom_pct:.1f}%)")
    if not mem.fits_host:
        text += (f"; host memory {gib(mem.host_bytes_per_node)} of {gib(mem.host_capacity_bytes_per_node)} "
                 f"GiB per node")
    return text


def drift_message(c: TargetCheck, report: CheckReport) -> str:
    """What the plan predicted when it was written against today's figure."""
    change = f" {_pct(c.drift_pct)}" if c.drift_pct is not None else ""
    return (f"memory prediction drifted{change}: {gib(c.stored_total_bytes)} GiB per GPU stored in the plan, "
            f"{gib(c.total_bytes)} GiB today (more than --drift {report.options.drift_pct:g}%)")


def summary_line(report: CheckReport) -> str:
    s = report.summary
    return (f"checked {s.plans} plan file{'s' if s.plans != 1 else ''} ({s.checks} "
            f"check{'s' if s.checks != 1 else ''}): {s.fits} fit, {s.does_not_fit} do not fit, {s.invalid} invalid, "
            f"{s.drifted} drifted, {s.warnings} other warning{'s' if s.warnings != 1 else ''}; exit {s.exit_code}")


# ---------------------------------------------------------------- text


def text_lines(report: CheckReport) -> list[str]:
    """One line per plan and target, then its warnings; plain text (no markup)."""
    lines = []
    strict = report.options.strict_drift
    for c in report.results:
        if c.verdict == "invalid":
            lines.append(f"error: {_where(c)}: invalid: {printable(c.error or '')}")
        else:
            lines.append(f"{'fits' if c.verdict == 'fits' else 'does not fit'}: {_where(c)}: {fit_line(c)}")
        if c.drifted:
            lines.append(f"{'error' if strict else 'warning'}: {_where(c)}: {drift_message(c, report)}")
        lines += [f"warning: {printable(c.path)}: {printable(w)}" for w in c.warnings]
    return lines


def failure_tables(report: CheckReport) -> list[Table]:
    """The memory breakdown of each plan and target that does not fit (rich tables)."""
    tables = []
    for c in report.results:
        if c.verdict == "does_not_fit":
            table = breakdown_table(c, escape(f"{_where(c)}: per-GPU memory"), limits=True)
            table.caption = layout_line(c.layout)
            tables.append(table)
    return tables


def breakdown_text(c: TargetCheck) -> str:
    """The memory breakdown as plain lines (JUnit failure bodies, annotation messages)."""
    mem = c.memory
    width = max(len(t) for t in [*mem.terms, "usable (capacity less margin)"])
    lines = [f"per-GPU memory on {c.target}, {layout_line(c.layout)} (peak: {mem.peak_phase}):"]
    lines += [f"  {name:<{width}} {gib(size):>10} GiB" for name, size in mem.terms.items() if size]
    lines.append(f"  {'total':<{width}} {gib(mem.total_bytes):>10} GiB")
    lines.append(f"  {'usable (capacity less margin)':<{width}} {gib(mem.usable_bytes):>10} GiB "
                 f"(capacity {gib(mem.capacity_bytes)} GiB, margin {100 * (c.safety_margin or 0):g}%)")
    if mem.host_bytes_per_node:
        lines.append(f"  host memory per node {gib(mem.host_bytes_per_node)} of "
                     f"{gib(mem.host_capacity_bytes_per_node)} GiB")
    return "\n".join(lines)


# ---------------------------------------------------------------- json


def check_json(report: CheckReport) -> dict:
    """One object per plan and target, the options and a summary."""
    return {
        "results": [c.model_dump(mode="json") for c in report.results],
        "options": report.options.model_dump(mode="json"),
        "summary": report.summary.model_dump(),
    }


# ---------------------------------------------------------------- junit


def junit_xml(report: CheckReport) -> str:
    """JUnit XML: a testcase per plan and target; does-not-fit (and drift, strict) is a failure
    carrying the breakdown, an invalid input an error; warnings go to system-out."""
    s = report.summary
    failures = sum(_junit_failure(c, report) is not None for c in report.results)
    suites = ET.Element("testsuites", name="ltune check", tests=str(s.checks), failures=str(failures),
                        errors=str(s.invalid))
    suite = ET.SubElement(suites, "testsuite", name="ltune check", tests=str(s.checks), failures=str(failures),
                          errors=str(s.invalid), skipped="0")
    for c in report.results:
        case = ET.SubElement(suite, "testcase", classname="ltune.check", name=_where(c), file=printable(c.path))
        if c.verdict == "invalid":
            ET.SubElement(case, "error", message=printable(c.error or ""), type="invalid")
            continue
        failure = _junit_failure(c, report)
        if failure is not None:
            message, kind = failure
            node = ET.SubElement(case, "failure", message=message, type=kind)
            node.text = breakdown_text(c)
        notes = [printable(w) for w in c.warnings]
        if c.drifted and not report.options.strict_drift:
            notes.insert(0, f"warning: {drift_message(c, report)}")
        out = [f"{c.verdict.replace('_', ' ')}: {fit_line(c)}", *notes]
        ET.SubElement(case, "system-out").text = "\n".join(out)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True)


def _junit_failure(c: TargetCheck, report: CheckReport) -> tuple[str, str] | None:
    """(message, type) of the failure a testcase carries, or None."""
    if c.verdict == "invalid":
        return None
    parts, kind = [], None
    if c.verdict == "does_not_fit":
        parts.append(f"does not fit: {fit_line(c)}")
        kind = "does_not_fit"
    if c.drifted and report.options.strict_drift:
        parts.append(drift_message(c, report) + " (--strict-drift)")
        kind = kind or "drift"
    return ("; ".join(parts), kind) if parts else None


# ---------------------------------------------------------------- github


def escape_data(text: str) -> str:
    """A workflow command's message: % then CR and LF escaped (actions/toolkit, command.ts escapeData)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """A workflow command's property value: escape_data, then : and , (command.ts escapeProperty)."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def annotation(level: str, path: str, title: str, message: str) -> str:
    return f"::{level} file={escape_property(printable(path))},title={escape_property(title)}::{escape_data(message)}"


def github_lines(report: CheckReport) -> list[str]:
    """`::error` for does-not-fit and invalid, `::warning` for drift (`::error` with --strict-drift)
    and other warnings; a fitting plan is a plain line (which never starts with `::`)."""
    lines = []
    strict = report.options.strict_drift
    for c in report.results:
        target = f" on {c.target}" if c.target else ""
        if c.verdict == "invalid":
            lines.append(annotation("error", c.path, f"ltune check: invalid plan{target}",
                                    f"{_where(c)}: invalid: {printable(c.error or '')}"))
        elif c.verdict == "does_not_fit":
            lines.append(annotation("error", c.path, f"ltune check: does not fit{target}",
                                    f"{_where(c)}: does not fit: {fit_line(c)}\n{breakdown_text(c)}"))
        else:
            lines.append(f"fits: {_where(c)}: {fit_line(c)}")
        if c.drifted:
            lines.append(annotation("error" if strict else "warning", c.path, f"ltune check: drift{target}",
                                    f"{_where(c)}: {drift_message(c, report)}"))
        lines += [annotation("warning", c.path, "ltune check: warning", printable(w)) for w in c.warnings]
    return lines
