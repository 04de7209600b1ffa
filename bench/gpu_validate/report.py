"""The table printed at the end of a run, one block per check, from results.json's content."""

from __future__ import annotations

from ltune.profiles import GIB

from bench.gpu_validate.common import MIB


def _gib(x) -> str:
    return "-" if x is None else f"{x / GIB:.2f}"


def _header(res: dict) -> list[str]:
    return [f"== ltune gpu_validate: {res.get('gpu')} (profile {res.get('gpu_profile')}), torch {res.get('torch')}, "
            f"commit {str(res.get('commit'))[:12]}, {res.get('elapsed_s')} s"]


def _cuda_context_lines(ctx: dict) -> list[str]:
    if ctx.get("context_bytes") is None:
        return [f"cuda context: {ctx.get('skipped') or ctx.get('error') or 'not run'}"]
    return [f"cuda context: {ctx['context_bytes'] / MIB:.0f} MiB (with attention "
            f"{(ctx.get('context_with_attention_bytes') or 0) / MIB:.0f} MiB, nvidia-smi process "
            f"{ctx.get('nvidia_smi_process_mib')} MiB) vs profile {ctx.get('profile_cuda_context_bytes', 0) / MIB:.0f} MiB"]


def _trainer_run_line(r: dict) -> str:
    if "measured" not in r:
        return f"trainer: {r['config']}: {r.get('outcome')}"
    mm, p = r["measured"], r["predicted"]
    return (
        f"trainer: {r['label']:<30} {_gib(mm.get('peak_allocated_bytes')):>6}/{_gib(p['allocated_bytes']):<6}      "
        f"{_gib(mm.get('peak_reserved_bytes')):>6}/{_gib(p['reserved_bytes']):<6}      "
        f"{mm.get('tokens_per_s_per_gpu', 0):>7.0f}/{p['tokens_per_s_per_gpu']:<7.0f}    "
        f"{_gib((r.get('trace') or {}).get('comparable_traced_bytes'))}  [{r['outcome']}]"
    )


def _trainer_runs_lines(check: dict) -> list[str]:
    head = "trainer: config                         alloc GiB meas/pred   reserved meas/pred   tok/s/GPU meas/pred  trace GiB"
    return [head] + [_trainer_run_line(r) for r in check.get("runs", [])]


def _matrix_row_line(r: dict) -> str:
    s = r["summary"]
    if s.get("outcome") != "ok" or "peak_allocated_bytes" not in s:
        return f"matrix: {r['label']:<42} {s.get('outcome')} {r['measured'].get('error', '')[:60]}{r['measured'].get('why', '')[:60]}"
    return (
        f"matrix: {r['label']:<42} {_gib(s['peak_allocated_bytes']):>6}/{_gib(r['predicted']['allocated_bytes']):<6} "
        f"{s['allocated_error_pct']:>+6.1f}  {_gib(s['peak_reserved_bytes']):>8}      {s['reserved_over_allocated']:.3f}    "
        f"{_gib((r.get('trace') or {}).get('comparable_traced_bytes'))}"
    )


def _groups_line(r: dict) -> str | None:
    """A row's term groups, measured/predicted GiB (None when nothing was measured)."""
    g = r.get("groups") or {}
    names = ("model_states_and_buffers", "optimizer_states", "activations_and_loss", "fragmentation", "outside_allocator")
    if not any((g.get(n) or {}).get("measured") is not None for n in names):
        return None
    return "matrix:   groups meas/pred GiB: " + ", ".join(
        f"{n} {_gib(g[n]['measured'])}/{_gib(g[n]['predicted'])}" for n in names if n in g)


def _trace_only_line(r: dict) -> str | None:
    """A trace-only row's per-rank activation terms, traced/predicted GiB."""
    acts = r.get("trace_activations")
    if not acts:
        return None
    return "matrix:   per-rank trace/pred GiB: " + ", ".join(
        f"{k} {_gib(v['traced'])}/{_gib(v['predicted'])}" for k, v in acts.items())


def _memory_matrix_lines(check: dict) -> list[str]:
    head = "matrix: config                                   alloc GiB meas/pred  err%   reserved GiB  res/alloc  trace GiB"
    lines = [head]
    for r in check.get("rows", []):
        lines.append(_matrix_row_line(r))
        lines += [x for x in (_groups_line(r), _trace_only_line(r)) if x]
    if check.get("estimated_s") is not None:
        lines.append(f"matrix: {check.get('wall_s')} s (GPU estimate {check['estimated_s']} s)")
    return lines


def _longest_context_lines(check: dict) -> list[str]:
    lines = []
    for kind in ("hf", "ltune"):
        if kind not in check:
            continue
        r, pl = check[kind], check.get(f"{kind}_predicted_longest", {})
        lines.append(
            f"longest: {kind:<6} longest ok {r['longest_ok']}, first OOM {r['first_oom']}, predicted {pl.get('margin_0')} "
            f"(margin 5%: {pl.get('margin_default')}); probes "
            + ", ".join(f"{p['seq_len']}:{p['outcome']}" for p in r["probes"])
            + (f"; stopped: {r['stopped']}" if r.get("stopped") else "")
        )
    if "ratio_ltune_over_hf" in check:
        lines.append(f"longest: ltune/hf longest context ratio {check['ratio_ltune_over_hf']} (goal >= 2)")
    return lines


def format_table(res: dict) -> str:
    """The whole table: header, then cuda_context, trainer_runs, memory_matrix, longest_context."""
    checks = res["checks"]
    return "\n".join(
        _header(res)
        + _cuda_context_lines(checks.get("cuda_context", {}))
        + _trainer_runs_lines(checks.get("trainer_runs", {}))
        + _memory_matrix_lines(checks.get("memory_matrix", {}))
        + _longest_context_lines(checks.get("longest_context", {}))
    )
