#!/usr/bin/env python
"""Split a prepared corpus (`csm prepare` output) into OUT/train and OUT/eval by whole conversations, holding out
only conversations none of whose sentences occur in other prepared corpora (`--unseen-in`), so that the eval loss
of a model trained on those corpora and OUT/train measures unseen sentences. Shards are symlinked, not copied.

This is how the embedded voice's eval set was made (its first corpus trained the model before the second existed):

    python scripts/split_prepared.py data/voice-s2/prep data/s2split --unseen-in data/voice30k/prep --eval 150
    csm train --data data/voice30k/prep,data/s2split/train --eval-data data/s2split/eval ...
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path


def _index(prepared: Path) -> list[dict]:
    """Rows of a prepared corpus's index.jsonl, or of a .jsonl manifest named directly (both have `text`)."""
    path = prepared if prepared.is_file() else prepared / "index.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prepared")
    p.add_argument("out")
    p.add_argument("--unseen-in", default="",
                   help="comma-separated prepared corpora (or .jsonl manifests) whose sentences eval must avoid")
    p.add_argument("--eval", type=int, default=150, help="conversations to hold out (at most; fewer if not enough)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    src, out = Path(args.prepared), Path(args.out)
    seen = {row["text"] for d in filter(None, args.unseen_in.split(",")) for row in _index(Path(d))}
    rows = _index(src)
    convs: dict[str, list[dict]] = {}
    for row in rows:
        convs.setdefault(str(row.get("conversation", "\0" + row["id"])), []).append(row)
    clean = sorted(c for c, turns in convs.items() if all(r["text"] not in seen for r in turns))
    random.Random(args.seed).shuffle(clean)
    held = set(clean[: args.eval])
    for name, keep in (("train", lambda c: c not in held), ("eval", lambda c: c in held)):
        part = out / name
        part.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if (f.suffix == ".safetensors" or f.name in ("meta.json", "tokenizer.json")) and not (part / f.name).exists():
                os.symlink(f.resolve(), part / f.name)
        chosen = [r for r in rows if keep(str(r.get("conversation", "\0" + r["id"])))]
        (part / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen))
        print(f"{part}: {len(chosen)} utterances, {len({str(r.get('conversation')) for r in chosen})} conversations")
    print(f"{len(clean)} conversations had only unseen sentences; {len(held)} held out")


if __name__ == "__main__":
    main()
