"""``python -m bench``: every workload, the figures to bench/RESULTS.md.

    python -m bench                      # the full run: 5 runs per figure (~20 min on 2 cores)
    python -m bench --quick              # 1 run, small sizes: to try the harness (~2-3 min)
    python -m bench --smoke --json out   # CI: tiny sizes, seconds, figures meaningless
    python -m bench --runs 3 --only bulk,redis --no-peer

A full run writes its section of bench/RESULTS.md (``--out`` elsewhere, ``--out -`` for
stdout only); ``--quick`` and ``--smoke`` print it unless given ``--out``. ``--json`` writes
every raw figure as well. Needs a ``redis-server`` binary on PATH; the peer
(``resumable-stream``) is installed from PyPI into a scratch venv unless ``--no-peer``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from bench._report import machine_facts, markdown, write_results
from bench._run import QUICK, SMOKE, WORKLOADS, Config, run

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def parse(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="1 run, small sizes")
    preset.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--runs", type=int, help="runs per figure (default 5; quick/smoke 1)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(WORKLOADS)}")
    parser.add_argument("--no-peer", action="store_true", help="skip resumable-stream")
    parser.add_argument("--no-hiredis-row", action="store_true", help="skip the no-hiredis row")
    parser.add_argument("--out", help="where the markdown goes ('-': stdout only)")
    parser.add_argument("--json", type=Path, help="also write every raw figure here")
    args = parser.parse_args(argv)
    cfg = SMOKE if args.smoke else QUICK if args.quick else Config()
    if args.runs is not None:
        cfg = replace(cfg, runs=max(args.runs, 1), capacity_runs=min(max(args.runs, 1), 3))
    if args.only:
        only = tuple(w.strip() for w in args.only.split(",") if w.strip())
        unknown = set(only) - set(WORKLOADS)
        if unknown:
            parser.error(f"unknown workloads {sorted(unknown)}; choose from {WORKLOADS}")
        cfg = replace(cfg, only=only)
    if args.no_peer:
        cfg = replace(cfg, peer=False)
    if args.no_hiredis_row:
        cfg = replace(cfg, no_hiredis_row=False)
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse(argv)
    command = shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
    with tempfile.TemporaryDirectory(prefix="turnstream-bench-") as scratch:
        sections, facts = run(cfg, Path(scratch))
    facts.update(machine_facts())
    text = markdown(sections, facts, cfg, command)
    print(text)
    out = args.out if args.out is not None else (None if cfg.preset != "full" else str(RESULTS))
    if out not in (None, "-"):
        write_results(Path(out), text)
        print(f"(written to {out})", file=sys.stderr)
    if args.json is not None:
        raw = {
            "config": asdict(cfg),
            "facts": facts,
            "sections": {
                s.key: {
                    "raw": s.raw,
                    "checks": [asdict(c) for c in s.checks],
                    "count_errors": s.count_errors,
                    "tables": s.tables,
                }
                for s in sections
            },
        }
        args.json.write_text(json.dumps(raw, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
