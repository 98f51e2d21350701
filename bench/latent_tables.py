"""latent_retrieval's Table 1 and Table 2 analogs from a run's (or `attrlab latent fit`'s) metrics.json.

    python -m bench.latent_tables runs/latent [--metrics PATH]

Table 1: nDCG@5/10/20 and identity similarity for InterFaceGAN and this method under the
preference settings (none / identity constrained / best nDCG), plus the unadjusted query (plain
latent L2). Table 2: nDCG@5 and identity similarity (constrained setting) per sparsity lambda,
with the entries holding 95% of each direction's energy (Fig. 6's statistic) and the validation
accuracy lambda is chosen by. Identity is `identity_sim` when the run has an identity model,
else `same_identity` (the share of retrieved images of the query's identity); the header says which.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def tables(m: dict[str, float]) -> str:
    ident = "identity_sim" if "identity_sim" in m else "same_identity"
    lines = [f"Table 1 analog ({int(m.get('queries', 0))} queries, gallery {int(m.get('gallery', 0))}; "
             f"identity = {ident})", "",
             "| method | preference | nDCG@5 | id@5 | nDCG@10 | id@10 | nDCG@20 | id@20 |", "|---|---|---|---|---|---|---|---|"]
    lines.append("| query as is (latent L2) | - | " + " | ".join(f"{m[f'l2/ndcg@{k}']:.3f} | -" for k in (5, 10, 20)) + " |")
    for prefix, name in (("ifg/", "InterFaceGAN"), ("", "ours (sparse + orthogonal)")):
        for setting, label in (("none", "no preference"), ("constrained", "identity constrained"), ("best", "best nDCG")):
            cells = [f"{m[f'{prefix}{setting}/ndcg@{k}']:.3f} | {m[f'{prefix}{setting}/identity_sim@{k}']:.3f}"
                     for k in (5, 10, 20)]
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Table 2 analog (identity constrained; chosen lambda = {m['lambda']:g})", "",
              f"| lambda | nDCG@5 | {ident}@5 | entries for 95% energy | val acc |", "|---|---|---|---|---|"]
    lams = sorted(float(mt.group(1)) for k in m if (mt := re.match(r"lam_([^/]+)/ndcg@5$", k)))
    for lam in lams:
        p = f"lam_{lam:g}/"
        lines.append(f"| {lam:g} | {m[p + 'ndcg@5']:.3f} | {m[p + 'identity_sim@5']:.3f} | {m[p + 'entries95']:.1f} | "
                     f"{m[p + 'val_acc']:.3f} |")
    lines.append(f"| InterFaceGAN | {m['ifg/ndcg@5']:.3f} | {m['ifg/constrained/identity_sim@5']:.3f} | "
                 f"{m['ifg/entries95']:.1f} | - |")
    lines += ["", f"max |F^T F - I| = {m['ortho_err']:.2e} (InterFaceGAN's unit normals: {m['ifg/ortho_err']:.3f})"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--metrics", type=Path, default=None)
    a = p.parse_args()
    path = a.metrics or a.run / "metrics.json"
    print(tables(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
