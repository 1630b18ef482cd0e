"""The optional PNG: time per implementation per shape, one panel per divergence (log scale)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional


def plot(rows: List[Dict], meta: Dict, path: Path) -> Optional[str]:
    """Write the plot to `path`; return why not when it cannot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install fastkd[bench])"
    ok = [r for r in rows if r.get("time_s")]
    divs = list(dict.fromkeys(r["divergence"] for r in ok))
    if not divs:
        return "plot skipped: no successful rows"
    shapes = list(dict.fromkeys(r["shape"] for r in ok))
    impls = list(dict.fromkeys(r["impl"] for r in ok))
    panel_width = max(5.0, 0.3 * len(shapes) * len(impls) + 2.0)
    fig, axes = plt.subplots(1, len(divs), figsize=(panel_width * len(divs), 4.5), squeeze=False)
    width = 0.8 / len(impls)
    for ax, div in zip(axes[0], divs):
        for j, name in enumerate(impls):
            xs, ys = [], []
            for i, shape in enumerate(shapes):
                hit = [r for r in ok if r["divergence"] == div and r["shape"] == shape and r["impl"] == name]
                if hit:
                    xs.append(i - 0.4 + (j + 0.5) * width)
                    ys.append(hit[0]["time_s"] * 1e3)
            ax.bar(xs, ys, width, label=name)
        for i, shape in enumerate(shapes):  # the floor, as a black line across each group
            fl = [r["floor_s"] for r in ok if r["shape"] == shape and r["divergence"] == div]
            if fl:
                ax.hlines(fl[0] * 1e3, i - 0.45, i + 0.45, colors="black", linestyles="--",
                          label="floor" if i == 0 else None)
        ax.set_xticks(range(len(shapes)), shapes)
        ax.set_yscale("log")
        ax.set_title(div)
        ax.set_ylabel("forward + backward (ms)")
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"fastkd {meta['op']} — {meta['device_name']} — {meta['dtype']}, T={meta['temperature']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
