"""Full benchmark: flexrope against x.clone() and the peers, at (4, 32, 1024, 128), with a plot.

    pip install -e ".[bench]"
    python benchmarks/bench_rope.py [--quick] [--out benchmarks/results]

Prints a table (case, time, the floor and its time in the same run, ratio) and writes
``<out>.md`` (the table) and ``<out>.png`` (time per case relative to the floor).
"""

import argparse
import pathlib

import torch

import harness


def plot(results, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r.case for r in results))
    who = list(dict.fromkeys(r.who for r in results))
    figure, axis = plt.subplots(figsize=(12, 5.5))
    width = 0.8 / len(who)
    for i, name in enumerate(who):
        xs, ys = [], []
        for j, case in enumerate(cases):
            for r in results:
                if r.case == case and r.who == name:
                    xs.append(j + i * width)
                    ys.append(r.ratio)
        axis.bar(xs, ys, width=width, label=name)
    axis.axhline(1.0, color="black", linewidth=1, linestyle="--", label="the floor")
    axis.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    axis.set_xticklabels(cases, rotation=40, ha="right", fontsize=7)
    axis.set_ylabel("time / floor time (same run)")
    axis.set_yscale("log")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer rounds, a smaller tensor")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = parser.parse_args()
    shape = (2, 16, 512, 128) if args.quick else (4, 32, 1024, 128)
    rounds = 5 if args.quick else 9
    header = harness.header()
    print(header)
    print(f"x of (b h s d) = {shape}; ratios to x.clone() (out of place) or out.copy_(x) (in place), timed in the "
          f"same run\n")
    results, notes = harness.run(shape, dtypes=(torch.float32, torch.bfloat16, torch.float16), rounds=rounds, number=3)
    results += harness.decode_latency(rounds=rounds, number=200)
    text = harness.table(results)
    print(text)
    for note in notes:
        print(f"note: {note}")
    out = pathlib.Path(args.out)
    out.with_suffix(".md").write_text(f"{header}\n\nx of (b h s d) = {shape}\n\n```\n{text}\n```\n"
                                      + "".join(f"\nnote: {n}" for n in notes))
    try:
        plot([r for r in results if not r.case.startswith("decode")], out.with_suffix(".png"),
             f"RoPE time relative to the floor (x.clone(); out.copy_(x) in place), {shape}, {header}")
        print(f"\nwrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    except ImportError:
        print(f"\nwrote {out.with_suffix('.md')} (no plot: matplotlib is not installed)")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
