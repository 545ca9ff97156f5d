"""The short summary `make demo` prints first: read the JSON reports the demo's steps wrote.

    python benchmarks/demo_summary.py OUT_DIR
"""

import json
import os
import sys


def _load(folder, name):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def main(folder: str) -> int:
    export, fold = _load(folder, "export.json"), _load(folder, "resnet50.report.json")
    before, after = _load(folder, "check.original.json"), _load(folder, "check.folded.json")
    bench = _load(folder, "bench.json")
    kinds = {}
    for a in fold["actions"]:
        kinds[a["action"]] = kinds.get(a["action"], 0) + 1
    p, v = export["parity"], fold["verification"]
    codes = {}
    for f in before["models"][0]["findings"]:
        codes[f["code"]] = codes.get(f["code"], 0) + 1
    print(f"== foldkit demo: {export['export']['model']} (trained with SyncBatchNorm, reverted to BatchNorm)")
    print(f"BatchNormalization: {fold['bn_before']} before -> {fold['bn_after']} after "
          f"({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})")
    print(f"verified: PyTorch vs ONNX Runtime max rel err {p['max_rel_err']:.1e}; original vs folded "
          f"({v['backend']}) max abs err {v['max_abs_err']:.1e}, max rel err {v['max_rel_err']:.1e} "
          f"(atol {v['atol']:g}, rtol {v['rtol']:g})")
    print(f"gate: original {'passes' if before['passed'] else 'FAILS'} "
          f"({', '.join(f'{n} x {c}' for c, n in sorted(codes.items())) or 'no findings'}); "
          f"folded {'ready to deploy' if after['passed'] else 'FAILS'}")
    for r in bench["rows"]:
        if r["vs_first"] is None:
            continue
        q = r["vs_first"]
        verdict = ("faster" if q["ci95"][1] < 1 else "slower") if q["significant"] else "no significant difference"
        why = " (ORT fuses Conv+BN itself at this level)" if r["runtime"].endswith("[all]") else ""
        print(f"latency {r['runtime']}, batch {r['batch']}, {q['rounds']} rounds: folded/original "
              f"{q['ratio']:.3f} [95% CI {q['ci95'][0]:.3f}, {q['ci95'][1]:.3f}]: {verdict}{why}")
    print(f"reports and plot in {folder}/ (export.json, resnet50.report.json, check.*.json, bench.json, bench.png); "
          "`make demo V=1` shows every table")
    return 0 if after["passed"] and not before["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "out"))
