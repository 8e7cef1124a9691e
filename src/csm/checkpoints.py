"""Reading and writing CSM weights in the three layouts we meet, and the one place their key names are mapped.

- "csm": ours (model.py names), written by training; config.json holds {"csm_config": CSMConfig.to_dict()}.
- "sesame": the original release (torchtune names: attn.q_proj, sa_norm.scale, mlp.w1, ...), `model.safetensors`
  or `ckpt.pt`, config.json with {"backbone_flavor": "llama-1B", ...}. torchtune's RoPE rotates adjacent pairs,
  ours rotates halves, so q/k projections are permuted on the way in and back on the way out.
- "transformers": `CsmForConditionalGeneration` (sesame/csm-1b on the hub). Its file may also hold the Mimi codec
  under `codec_model.`; those tensors are passed through untouched (see `load_state_dict_file`).

Only safetensors or `torch.load(weights_only=True)` are used: no pickled code is ever executed.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from .config import FLAVORS, CSMConfig, TransformerConfig
from .hub import ModelFilesNotFound, find_files
from .model import CSM

LAYOUTS = ("csm", "sesame", "transformers")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "ckpt.pt", "model.pt")
CODEC_PREFIX = "codec_model."


class CheckpointError(ValueError):
    """A checkpoint whose keys, shapes or config do not fit the model."""


# --- key mapping ----------------------------------------------------------------------------------------------

Transform = Callable[[torch.Tensor], torch.Tensor]

_BLOCK_NAMES = {  # ours -> (sesame, transformers), inside one transformer layer
    "attn_norm.weight": ("sa_norm.scale", "input_layernorm.weight"),
    "attn.wq.weight": ("attn.q_proj.weight", "self_attn.q_proj.weight"),
    "attn.wk.weight": ("attn.k_proj.weight", "self_attn.k_proj.weight"),
    "attn.wv.weight": ("attn.v_proj.weight", "self_attn.v_proj.weight"),
    "attn.wo.weight": ("attn.output_proj.weight", "self_attn.o_proj.weight"),
    "mlp_norm.weight": ("mlp_norm.scale", "post_attention_layernorm.weight"),
    "mlp.w1.weight": ("mlp.w1.weight", "mlp.gate_proj.weight"),
    "mlp.w2.weight": ("mlp.w2.weight", "mlp.down_proj.weight"),
    "mlp.w3.weight": ("mlp.w3.weight", "mlp.up_proj.weight"),
}
_TOP_NAMES = {  # ours -> (sesame, transformers)
    "text_embeddings.weight": ("text_embeddings.weight", "embed_text_tokens.weight"),
    "audio_embeddings.weight": ("audio_embeddings.weight", "backbone_model.embed_tokens.embed_audio_tokens.weight"),
    "codebook0_head.weight": ("codebook0_head.weight", "lm_head.weight"),
    "projection.weight": ("projection.weight", "depth_decoder.model.inputs_embeds_projector.weight"),
    "audio_head": ("audio_head", "depth_decoder.codebooks_head.weight"),
    "backbone.norm.weight": ("backbone.norm.scale", "backbone_model.norm.weight"),
    "decoder.norm.weight": ("decoder.norm.scale", "depth_decoder.model.norm.weight"),
}
_STACK_PREFIX = {"backbone": ("backbone.layers", "backbone_model.layers"), "decoder": ("decoder.layers", "depth_decoder.model.layers")}
# transformers keeps a second (tied) copy of the audio embeddings inside its depth decoder.
_TIED_DECODER_EMBEDDINGS = "depth_decoder.model.embed_tokens.weight"
_HF_AUDIO_EMBEDDINGS = "backbone_model.embed_tokens.embed_audio_tokens.weight"


def _rope_pairs_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """torchtune q/k rows (dims 2i, 2i+1 rotate together) -> rotate-half rows (dims i, i + d/2)."""
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _rope_halves_to_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def key_map(cfg: CSMConfig, layout: str) -> Iterator[tuple[str, str, Transform | None, Transform | None]]:
    """Yield (our key, their key, theirs->ours transform, ours->theirs transform) for every tensor."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {LAYOUTS}")
    col = {"sesame": 0, "transformers": 1}.get(layout)
    for ours, names in _TOP_NAMES.items():
        yield ours, ours if col is None else names[col], None, None
    for stack, tcfg in (("backbone", cfg.backbone), ("decoder", cfg.decoder)):
        for i in range(tcfg.n_layers):
            for ours, names in _BLOCK_NAMES.items():
                our_key = f"{stack}.layers.{i}.{ours}"
                if col is None:
                    yield our_key, our_key, None, None
                    continue
                their_key = f"{_STACK_PREFIX[stack][col]}.{i}.{names[col]}"
                if layout == "sesame" and ours in ("attn.wq.weight", "attn.wk.weight"):
                    heads = tcfg.n_heads if ours == "attn.wq.weight" else tcfg.n_kv_heads
                    yield (
                        our_key,
                        their_key,
                        lambda w, h=heads: _rope_pairs_to_halves(w, h),
                        lambda w, h=heads: _rope_halves_to_pairs(w, h),
                    )
                else:
                    yield our_key, their_key, None, None


def detect_layout(keys) -> str:
    keys = set(keys)
    if "backbone.layers.0.attn.wq.weight" in keys:
        return "csm"
    if "backbone.layers.0.attn.q_proj.weight" in keys:
        return "sesame"
    if "backbone_model.layers.0.self_attn.q_proj.weight" in keys:
        return "transformers"
    sample = sorted(keys)[:8]
    raise CheckpointError(f"unrecognised CSM checkpoint layout (first keys: {sample})")


def convert_to_ours(state_dict: dict[str, torch.Tensor], cfg: CSMConfig, layout: str) -> dict[str, torch.Tensor]:
    """Rename (and permute) a checkpoint into our keys; error listing every missing/unexpected key."""
    if layout == "transformers" and _HF_AUDIO_EMBEDDINGS not in state_dict and _TIED_DECODER_EMBEDDINGS in state_dict:
        # transformers saves tied tensors once, under either name.
        state_dict = {**state_dict, _HF_AUDIO_EMBEDDINGS: state_dict[_TIED_DECODER_EMBEDDINGS]}
    out, used = {}, set()
    missing = []
    for ours, theirs, to_ours, _ in key_map(cfg, layout):
        if theirs not in state_dict:
            missing.append(theirs)
            continue
        t = state_dict[theirs]
        out[ours] = to_ours(t) if to_ours else t
        used.add(theirs)
    ignored = {k for k in state_dict if k.startswith(CODEC_PREFIX)}
    if layout == "transformers" and _TIED_DECODER_EMBEDDINGS in state_dict:
        ignored.add(_TIED_DECODER_EMBEDDINGS)
        tied, ref = state_dict[_TIED_DECODER_EMBEDDINGS], out.get("audio_embeddings.weight")
        if ref is not None and (tied.shape != ref.shape or not torch.equal(tied, ref)):
            raise CheckpointError(
                f"{_TIED_DECODER_EMBEDDINGS} differs from the backbone audio embeddings; CSM shares one table"
            )
    unexpected = sorted(set(state_dict) - used - ignored)
    if missing or unexpected:
        raise CheckpointError(
            f"{layout} checkpoint does not match the config: missing keys {missing or 'none'}; "
            f"unexpected keys {unexpected or 'none'}"
        )
    return out


def convert_from_ours(state_dict: dict[str, torch.Tensor], cfg: CSMConfig, layout: str) -> dict[str, torch.Tensor]:
    state_dict = unfuse_state_dict(state_dict, cfg)  # a Generator's model has fused projections
    out = {}
    for ours, theirs, _, from_ours in key_map(cfg, layout):
        t = state_dict[ours]
        out[theirs] = from_ours(t) if from_ours else t
    if layout == "transformers":
        out[_TIED_DECODER_EMBEDDINGS] = out[_HF_AUDIO_EMBEDDINGS]
    return out


# --- configs --------------------------------------------------------------------------------------------------


def _rope_from_hf(d: dict) -> dict:
    """transformers config (rope_parameters, or legacy rope_theta + rope_scaling) -> our rope fields."""
    params = dict(d.get("rope_parameters") or {})
    legacy = d.get("rope_scaling") or {}
    theta = params.get("rope_theta", d.get("rope_theta", 500_000.0))
    rope_type = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    src = params if "factor" in params else legacy
    if rope_type == "default":
        return {"rope_base": float(theta), "rope_scale_factor": None}
    if rope_type != "llama3":
        raise CheckpointError(f"unsupported RoPE type {rope_type!r} (CSM uses llama3 scaling)")
    return {
        "rope_base": float(theta),
        "rope_scale_factor": float(src["factor"]),
        "rope_low_freq_factor": float(src["low_freq_factor"]),
        "rope_high_freq_factor": float(src["high_freq_factor"]),
        "rope_original_max_seq_len": int(src["original_max_position_embeddings"]),
    }


def _transformer_from_hf(d: dict) -> TransformerConfig:
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if d.get(key, want) != want:
            raise CheckpointError(f"unsupported config: {key}={d[key]!r} (expected {want!r})")
    return TransformerConfig(
        n_layers=d["num_hidden_layers"],
        dim=d["hidden_size"],
        n_heads=d["num_attention_heads"],
        n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        intermediate_size=d["intermediate_size"],
        max_seq_len=d["max_position_embeddings"],
        head_dim=d.get("head_dim"),
        norm_eps=d.get("rms_norm_eps", 1e-5),
        **_rope_from_hf(d),
    )


def _rope_to_hf(t: TransformerConfig) -> dict:
    if t.rope_scale_factor is None:
        return {"rope_type": "default", "rope_theta": t.rope_base}
    return {
        "rope_type": "llama3",
        "rope_theta": t.rope_base,
        "factor": t.rope_scale_factor,
        "low_freq_factor": t.rope_low_freq_factor,
        "high_freq_factor": t.rope_high_freq_factor,
        "original_max_position_embeddings": t.rope_original_max_seq_len,
    }


def _transformer_to_hf(t: TransformerConfig) -> dict:
    return {
        "num_hidden_layers": t.n_layers,
        "hidden_size": t.dim,
        "num_attention_heads": t.n_heads,
        "num_key_value_heads": t.n_kv_heads,
        "head_dim": t.head_dim,
        "intermediate_size": t.intermediate_size,
        "max_position_embeddings": t.max_seq_len,
        "rms_norm_eps": t.norm_eps,
        "hidden_act": "silu",
        "rope_parameters": _rope_to_hf(t),
    }


def config_from_json(d: dict, layout: str) -> CSMConfig:
    if "csm_config" in d:  # ours; also written beside sesame-layout tensors of non-released sizes
        return CSMConfig.from_dict(d["csm_config"])
    if layout == "sesame":
        try:
            backbone, decoder = FLAVORS[d["backbone_flavor"]], FLAVORS[d["decoder_flavor"]]
        except KeyError as e:
            raise CheckpointError(f"unknown Sesame model flavor {e}; known: {sorted(FLAVORS)}") from None
        return CSMConfig(
            backbone=backbone,
            decoder=decoder,
            text_vocab_size=d.get("text_vocab_size", 128_256),
            audio_vocab_size=d.get("audio_vocab_size", 2051),
            audio_num_codebooks=d.get("audio_num_codebooks", 32),
        )
    k = d.get("num_codebooks", 32)
    # transformers stores 33 positions for the depth decoder; one frame only ever uses k of them.
    decoder = replace(_transformer_from_hf(d["depth_decoder_config"]), max_seq_len=k)
    return CSMConfig(
        backbone=_transformer_from_hf(d),
        decoder=decoder,
        text_vocab_size=d.get("text_vocab_size", 128_256),
        audio_vocab_size=d.get("vocab_size", 2051),
        audio_num_codebooks=k,
    )


def config_to_json(cfg: CSMConfig, layout: str) -> dict:
    flavors = {v: k for k, v in FLAVORS.items()}
    if layout == "csm" or (layout == "sesame" and (cfg.backbone not in flavors or cfg.decoder not in flavors)):
        return {"csm_config": cfg.to_dict()}
    if layout == "sesame":
        return {
            "backbone_flavor": flavors[cfg.backbone],
            "decoder_flavor": flavors[cfg.decoder],
            "text_vocab_size": cfg.text_vocab_size,
            "audio_vocab_size": cfg.audio_vocab_size,
            "audio_num_codebooks": cfg.audio_num_codebooks,
        }
    d = {
        "model_type": "csm",
        "architectures": ["CsmForConditionalGeneration"],
        **_transformer_to_hf(cfg.backbone),
        "text_vocab_size": cfg.text_vocab_size,
        "vocab_size": cfg.audio_vocab_size,
        "num_codebooks": cfg.audio_num_codebooks,
        "tie_codebooks_embeddings": True,
        "depth_decoder_config": {
            "model_type": "csm_depth_decoder_model",
            **_transformer_to_hf(cfg.decoder),
            "backbone_hidden_size": cfg.backbone.dim,
            "vocab_size": cfg.audio_vocab_size,
            "num_codebooks": cfg.audio_num_codebooks,
        },
    }
    return d


def _infer_config(sd: dict[str, torch.Tensor], layout: str) -> CSMConfig:
    """No config.json: recognise the released shapes (the original ckpt.pt ships without one)."""
    text = sd.get("text_embeddings.weight", sd.get("embed_text_tokens.weight"))
    if text is not None and text.shape[1] == FLAVORS["llama-1B"].dim:
        return CSMConfig(backbone=FLAVORS["llama-1B"], decoder=FLAVORS["llama-100M"], text_vocab_size=text.shape[0])
    raise CheckpointError(
        f"no config.json next to this {layout} checkpoint and its shapes are not the released CSM-1B; "
        "add a config.json"
    )


# --- files ----------------------------------------------------------------------------------------------------

INT8_SCALE = ".int8_scale"  # beside a weight stored as int8 rows: its float32 scale per row


def pack_int8(sd: dict[str, torch.Tensor], min_numel: int = 4096) -> dict[str, torch.Tensor]:
    """Storage for a small shipped model: every floating tensor of 2+ dims and at least `min_numel` elements as int8
    with a symmetric scale per row (`_int8_rows`), under `key` and `key + INT8_SCALE`; the rest unchanged. A quarter of
    float32's bytes; `unpack_int8` (which every loader runs) gives float32 back."""
    out = {}
    for key, w in sd.items():
        if not w.is_floating_point() or w.dim() < 2 or w.numel() < min_numel:
            out[key] = w
            continue
        rows = _int8_rows(w.detach().float())
        scale = rows.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        out[key] = (rows / scale[:, None]).round().clamp(-127, 127).to(torch.int8).reshape(w.shape)
        out[key + INT8_SCALE] = scale
    return out


def unpack_int8(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `pack_int8`: int8 rows times their scale, as float32; a state dict without int8 passes as is."""
    if not any(k.endswith(INT8_SCALE) for k in sd):
        return sd
    out = {k: v for k, v in sd.items() if not k.endswith(INT8_SCALE)}
    for key in (k[: -len(INT8_SCALE)] for k in sd if k.endswith(INT8_SCALE)):
        w, scale = sd[key], sd[key + INT8_SCALE].float()
        out[key] = (_int8_rows(w.float()) * scale[:, None]).reshape(w.shape)
    return out


def _int8_rows(w: torch.Tensor) -> torch.Tensor:
    """The rows that share a scale: a matrix's (or the codebook heads') last dimension when it is long, else all
    of a convolution's output channel."""
    return w.reshape(-1, w.shape[-1]) if w.shape[-1] >= 64 else w.reshape(w.shape[0], -1)



def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read tensors from .safetensors (or a sharded index) or a tensors-only torch file."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for shard in shards:
            sd.update(load_state_dict_file(path.parent / shard))
        return sd
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return unpack_int8(load_file(str(path)))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} as a tensors-only torch checkpoint: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # {"model": state_dict, ...} wrappers
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors")
    return obj


def _read_json_beside(weights: Path, source) -> dict | None:
    candidate = weights.parent / "config.json"
    if candidate.is_file():
        return json.loads(candidate.read_text())
    if not Path(source).exists():  # hub id: config.json is a separate download
        try:
            return json.loads(find_files(source, ["config.json"]).read_text())
        except ModelFilesNotFound:
            return None
    return None


def load_checkpoint(
    source: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[CSM, dict[str, torch.Tensor]]:
    """Load a CSM from a directory, a weights file, or a hub id, in any of the three layouts.

    Returns (model in eval mode, extra tensors): the extras are the `codec_model.*` tensors of a transformers
    checkpoint (prefix stripped), empty otherwise.
    """
    weights = find_files(source, WEIGHT_FILES)
    sd = load_state_dict_file(weights)
    layout = detect_layout(sd)
    meta = _read_json_beside(weights, source)
    cfg = config_from_json(meta, layout) if meta else _infer_config(sd, layout)
    ours = convert_to_ours(sd, cfg, layout)
    codec = {k[len(CODEC_PREFIX) :]: v for k, v in sd.items() if k.startswith(CODEC_PREFIX)}
    del sd

    with torch.device("meta"):
        model = CSM(cfg)
    expected = model.state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}" for k, v in ours.items()
           if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise CheckpointError("checkpoint shapes do not match the config: " + "; ".join(bad))
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    ours = {k: v.to(device=device, dtype=dtype) for k, v in ours.items()}
    model.load_state_dict(ours, assign=True, strict=True)
    model.reset_buffers(device)
    return model.eval(), codec


def unfuse_state_dict(sd: dict[str, torch.Tensor], cfg: CSMConfig) -> dict[str, torch.Tensor]:
    """Split the inference-fused projections (CSM.fuse_projections) back into wq/wk/wv and w1/w3."""
    out = {}
    for key, v in sd.items():
        stack = cfg.backbone if key.startswith("backbone.") else cfg.decoder
        if key.endswith(".attn.wqkv.weight"):
            base, kv = key[: -len("wqkv.weight")], stack.n_kv_heads * stack.head_dim
            for name, part in zip(("wq", "wk", "wv"), v.split([stack.n_heads * stack.head_dim, kv, kv])):
                out[f"{base}{name}.weight"] = part
        elif key.endswith(".mlp.w13.weight"):
            base = key[: -len("w13.weight")]
            out[f"{base}w1.weight"], out[f"{base}w3.weight"] = v.chunk(2)
        else:
            out[key] = v
    return out


def save_checkpoint(model: CSM, directory: str | os.PathLike, **kwargs) -> Path:
    """Write a model as `model.safetensors` + `config.json` (see `save_state_dict` for the options)."""
    return save_state_dict(model.cfg, model.state_dict(), directory, **kwargs)


def save_state_dict(
    cfg: CSMConfig,
    state_dict: dict[str, torch.Tensor],
    directory: str | os.PathLike,
    *,
    layout: str = "csm",
    dtype: torch.dtype | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    extra_config: dict | None = None,
    int8: bool = False,
) -> Path:
    """Write weights in our key names (e.g. merged LoRA or gathered FSDP weights) as `model.safetensors` +
    `config.json` in `layout` into `directory` (created). Returns the directory.

    extra_tensors / extra_config are merged in verbatim (e.g. `codec_model.*` weights and `codec_config` for a
    transformers checkpoint that carries its codec). `int8` stores the big matrices as int8 rows (`pack_int8`).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach() for k, v in state_dict.items()}
    out = convert_from_ours(sd, cfg, layout)
    out.update(extra_tensors or {})
    # safetensors refuses aliased tensors: give every entry its own contiguous storage.
    out = {k: v.to(dtype or v.dtype).contiguous().clone().cpu() for k, v in out.items()}
    if int8:  # the big matrices as int8 rows (pack_int8), the rest in `dtype`
        out = {k: v.contiguous() for k, v in pack_int8(out).items()}
    save_file(out, str(directory / "model.safetensors"), metadata={"format": "pt", "layout": layout})
    meta = config_to_json(cfg, layout)
    meta.update(extra_config or {})
    (directory / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return directory
