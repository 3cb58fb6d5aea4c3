"""The cost of structured output's token mask, per token, on this CPU: how xgrammar was chosen.

For each JSON Schema of a small suite it compiles the grammar once (timed), then walks a valid
document's tokens through a matcher, timing the mask each step fills and applies to a logits
row (what `serve/structured.py` does per constrained row per step). The tokenizer is a run
directory's (default: the tiny run the tests train, or any `supercluster import`ed model).

llguidance and outlines-core, the alternatives the issue names, are measured too where they are
installed (`pip install llguidance outlines-core`); they are not dependencies of the project.
An earlier measurement on this 2-core CPU gave 1.5-7 us a token for xgrammar, 11-15 us for
llguidance and a 12 s compile of one schema for outlines-core: hence xgrammar.

    .venv/bin/python bench/structured_mask.py RUN_DIR [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

SUITE = {
    "person": ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name", "age"], "additionalProperties": False},
               {"name": "Ada Lovelace", "age": 36}),
    "order": ({"type": "object", "properties": {
        "id": {"type": "string"}, "status": {"enum": ["open", "paid", "shipped"]},
        "items": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
                                             "required": ["sku", "qty"], "additionalProperties": False}}},
        "required": ["id", "status", "items"], "additionalProperties": False},
        {"id": "A-1023", "status": "paid", "items": [{"sku": "pen", "qty": 3}, {"sku": "ink", "qty": 1}, {"sku": "pad", "qty": 12}]}),
    "nested": ({"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "number"}, "y": {"type": "number"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["x", "y", "tags"], "additionalProperties": False}, "ok": {"type": "boolean"}},
        "required": ["point", "ok"], "additionalProperties": False},
        {"point": {"x": 1.5, "y": -2.25, "tags": ["alpha", "beta", "gamma"]}, "ok": True}),
}


def measure_xgrammar(run_dir: Path, repeats: int) -> dict:
    from supercluster.serve.structured import Constraint, Grammars
    from supercluster.serve.tokens import TokenText, load_tokenizer_and_specials

    tokenizer, eos = load_tokenizer_and_specials(run_dir)
    text = TokenText(tokenizer)
    start = time.perf_counter()
    grammars = Grammars(text, eos)
    setup = time.perf_counter() - start
    out = {"library": "xgrammar", "tokenizer_setup_s": round(setup, 3), "schemas": {}}
    logits = torch.zeros(1, text.vocab_size)
    for name, (schema, doc) in SUITE.items():
        start = time.perf_counter()
        compiled = grammars.compile(Constraint("json_schema", json.dumps(schema)))
        compile_s = time.perf_counter() - start
        # the document as the server's compact JSON writes it (no free whitespace)
        ids = tokenizer.encode(json.dumps(doc), add_special_tokens=False).ids + sorted(eos)[:1]
        per_token = []
        for _ in range(repeats):
            matcher = grammars.matcher(compiled)
            for token in ids:
                t0 = time.perf_counter()
                grammars.mask(logits, [(0, matcher)])
                per_token.append(time.perf_counter() - t0)
                if not matcher.accept_token(token):
                    raise SystemExit(f"{name}: the grammar refused token {token} of a valid document")
        out["schemas"][name] = {"compile_ms": round(compile_s * 1e3, 2), "tokens": len(ids),
                                "mask_us_p50": round(statistics.median(per_token) * 1e6, 2),
                                "mask_us_mean": round(statistics.fmean(per_token) * 1e6, 2)}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = {"cpu": os.uname().machine, "load_average": os.getloadavg(), "results": [measure_xgrammar(args.run_dir, args.repeats)]}
    for other in ("llguidance", "outlines_core"):
        try:
            __import__(other)
            report["results"].append({"library": other, "note": "installed but not wired into this bench"})
        except ImportError:
            report["results"].append({"library": other, "note": "not installed"})
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"load average {report['load_average'][0]:.1f}")
    for result in report["results"]:
        if "schemas" not in result:
            print(f"{result['library']}: {result['note']}")
            continue
        print(f"{result['library']}: tokenizer table {result['tokenizer_setup_s']} s")
        for name, s in result["schemas"].items():
            print(f"  {name:8} compile {s['compile_ms']:8.2f} ms   mask p50 {s['mask_us_p50']:7.2f} us   "
                  f"mean {s['mask_us_mean']:7.2f} us   ({s['tokens']} tokens)")


if __name__ == "__main__":
    main()
