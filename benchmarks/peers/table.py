"""One markdown table from several run_peers.py --json files (e.g. one per batch size).

    python benchmarks/peers/table.py all_b16.json all_b32.json all_b64.json

Per (model, size, batch): every framework's median ms/step and CPU ms/step, and lightflax's
ratios to tf.keras and to lightflax on XLA's kernels, wall and CPU. The ratios here are ratios
of the medians of ONE interleaved run (run_peers.py's own per-round ratio is to the best peer).
"""

import json
import sys


def _short(detail: str) -> str:
    if detail.startswith("lightflax"):
        kind = detail.split()[1]
        return f"lightflax {kind}" + (" huge_pages=1" if "huge_pages=1" in detail else "")
    return detail


def main(paths):
    rows = [r for p in paths for r in json.load(open(p))]
    for r in rows:
        r.setdefault("batch", round(r["images_per_s"] * r["ms_per_step"] / 1e3))
    keys = sorted({(r["model"], r["size"], r["batch"]) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    print("| model | size | batch | tf.keras ms (CPU ms) | torch ms (CPU ms) | lightflax xla ms (CPU ms) "
          "| lightflax native ms (CPU ms) | native / tf.keras wall (CPU) | xla / native wall (CPU) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key in keys:
        group = {_short(r["detail"]): r for r in rows if (r["model"], r["size"], r["batch"]) == key}
        cell = lambda n: (f"{group[n]['ms_per_step']:.0f} ({group[n]['cpu_ms_per_step']:.0f})"  # noqa: E731
                          if n in group else "-")
        tf, nat, xla = group.get("tf.keras 2.21.0"), group.get("lightflax native"), group.get("lightflax xla")
        torch = next((n for n in group if n.startswith("torch")), None)
        vs_tf = (f"**{nat['ms_per_step'] / tf['ms_per_step']:.2f}** ({nat['cpu_ms_per_step'] / tf['cpu_ms_per_step']:.2f})"
                 if tf and nat else "-")
        vs_xla = (f"{xla['ms_per_step'] / nat['ms_per_step']:.2f} ({xla['cpu_ms_per_step'] / nat['cpu_ms_per_step']:.2f})"
                  if xla and nat else "-")
        model = key[0] + (" K=5" if key[0] == "xray_light" else "")
        print(f"| {model} | {key[1]}² | {key[2]} | {cell('tf.keras 2.21.0')} | {cell(torch) if torch else '-'} | "
              f"{cell('lightflax xla')} | {cell('lightflax native')} | {vs_tf} | {vs_xla} |")


if __name__ == "__main__":
    main(sys.argv[1:])
