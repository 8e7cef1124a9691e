#!/usr/bin/env python
"""Ground-truth-aligned codes: what a voice's CSM *samples* for each frame of real clips, to train its codec decoder on.

Tacotron 2 trained its vocoder on the acoustic model's predictions made with the true past ("ground-truth aligned"),
so that the vocoder learns to turn the model's imperfect output, not only perfect features, into clean audio. Here
the CSM reads each clip teacher-forced (its text, then its true frames) and, for every frame, draws codebook 0 from
the backbone and codebooks 1..K-1 from the decoder with the voice's own top-k / temperature (what free-running
generation draws, without its drift; `scripts/teacher_forced.py` measured that drift as nothing). The draws stay
aligned with the clip frame for frame, so `csm train-codec --decoder-only --data OUT` can learn to decode them
into the clip's audio.

    python scripts/gta_codes.py data/codec-piper/manifest.jsonl,data/codec-espeak/manifest.jsonl data/gta --draws 4

OUT/codes.safetensors holds, for clip i, `true.i` (the codec's codes, [K, F]) and `gta.i` (the draws, [R, K, F]);
OUT/manifest.jsonl lists the clips in that order (absolute audio path, text, speaker, frames).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from csm.audio import load_audio
from csm.frames import Segment, segment_frames
from teacher_forced import _draw, fill_acoustic, load_voice  # this folder's diagnosis script: the same draws


def draw_frames(model, h: torch.Tensor, logits: torch.Tensor, draws: int, topk: int, temperature: float,
                g: torch.Generator) -> torch.Tensor:
    """Hidden states h [F, dim] and codebook-0 logits [F, V] of frames read with their true past -> [R, K, F] codes
    drawn as generation draws them (codebook 0 from the backbone, then each acoustic codebook given the ones drawn)."""
    c0 = _draw(logits.repeat(draws, 1), topk, temperature, g)
    codes = fill_acoustic(model, h.repeat(draws, 1), c0, topk, temperature, g)  # [R * F, K]
    return codes.view(draws, h.shape[0], -1).transpose(1, 2)


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifests", help="jsonl manifests (audio, text, speaker), several joined by commas")
    p.add_argument("out", type=Path)
    p.add_argument("--model", default=None, help="model directory with its codec (default: the embedded voice)")
    p.add_argument("--draws", type=int, default=4, help="sampled code sequences per clip")
    p.add_argument("--topk", type=int, default=None, help="default: the model's (generation.json)")
    p.add_argument("--temperature", type=float, default=None, help="default: the model's (generation.json)")
    p.add_argument("--max-clips", type=int, default=0, help="only the first N clips of each manifest (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    gen, topk, temperature = load_voice(args)
    m, k = gen.model, gen.num_codebooks

    rows = []
    for manifest in filter(None, args.manifests.split(",")):
        manifest = Path(manifest)
        lines = [json.loads(x) for x in manifest.read_text(encoding="utf-8").splitlines() if x.strip()]
        for r in lines[: args.max_clips or None]:
            rows.append({"audio": str((manifest.parent / r["audio"]).resolve()), "text": r["text"],
                         "speaker": int(r.get("speaker") or 0)})
    args.out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    tensors, kept, skipped, t0 = {}, [], 0, time.perf_counter()
    for row in tqdm(rows, desc="gta codes", dynamic_ncols=True):
        try:
            codes = gen.encode_audio(load_audio(row["audio"], sample_rate=gen.sample_rate))  # [K, F]
            tokens, mask = segment_frames(gen.tokenizer, Segment(row["speaker"], row["text"], codes), k)
        except (OSError, ValueError) as e:
            print(f"skipped {row['audio']}: {e}", file=sys.stderr)
            skipped += 1
            continue
        h, logits = m.backbone_forward(tokens[None], mask[None])
        first = len(tokens) - codes.shape[1] - 2  # the last text frame predicts the first audio frame
        f = codes.shape[1]
        drawn = draw_frames(m, h[0, first: first + f], logits[0, first: first + f], args.draws, topk, temperature, g)
        drawn = gen.codec_ready(drawn).cpu()  # ids past the codec's codebook decode as 0, as in generation
        i = len(kept)
        tensors[f"true.{i}"] = codes.to(torch.int16).contiguous()
        tensors[f"gta.{i}"] = drawn.to(torch.int16).contiguous()
        kept.append(row | {"frames": f})
    save_file(tensors, str(args.out / "codes.safetensors"),
              metadata={"model": str(args.model), "topk": str(topk), "temperature": str(temperature),
                        "draws": str(args.draws)})
    with open(args.out / "manifest.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in kept)
    print(f"{len(kept)} clips ({sum(r['frames'] for r in kept)} frames) x {args.draws} draws -> {args.out} in "
          f"{time.perf_counter() - t0:.0f} s" + (f"; {skipped} skipped" if skipped else ""))


if __name__ == "__main__":
    main()
