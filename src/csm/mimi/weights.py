"""Loading Mimi weights: every checkpoint key name this package knows, in one place.

Three layouts are understood, all mapped onto the names of `csm.mimi.Mimi` (which follow transformers' flat names
wherever they can):
- transformers `MimiModel` as published (`kyutai/mimi` model.safetensors): `encoder.layers.0.conv.weight`,
  `encoder_transformer.layers.0.self_attn.q_proj.weight`, `quantizer.semantic_residual_vector_quantizer.layers.0.
  codebook.embed_sum`, ... A transformers >= 5 in-memory `state_dict()` (`encoder.encoder_seanet.layers...`) is
  renamed to that first. Inside a CSM checkpoint (`sesame/csm-1b`) the same keys carry the prefix `codec_model.`.
- Kyutai's original (`tokenizer-e351c8d8-checkpoint125.safetensors`, names of the `moshi` package):
  `encoder.model.0.conv.conv.weight`, fused `self_attn.in_proj_weight` with interleaved RoPE pairs (newer moshi
  names it `in_projs.0.weight` in memory, and `out_proj` `out_projs.0`),
  `quantizer.rvq_first.vq.layers.0._codebook.embedding_sum`, ...
Codebooks are stored as `embed_sum / cluster_usage.clamp(min=1e-5)`, as both references compute them.
Only safetensors, or `torch.load(weights_only=True)`, are read: no pickled code is ever executed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ..hub import ModelFilesNotFound, find_files
from .config import PRESETS, MimiConfig
from .model import Mimi

KYUTAI_CHECKPOINT = "tokenizer-e351c8d8-checkpoint125.safetensors"
CSM_PREFIX = "codec_model."
# Kyutai's name first: Kyutai repos (e.g. kyutai/moshiko-pytorch-bf16) also hold a model.safetensors that is the LM.
WEIGHT_CANDIDATES = (KYUTAI_CHECKPOINT, "model.safetensors", "model.safetensors.index.json")
MEL_MODEL_TYPE = "csm_mel_codec"  # config.json of a codec with the spectral front end (spectral.py)
_EPS = 1e-5  # cluster_usage clamp, as in moshi and transformers
_MISSING = "!missing:"  # marks a tensor `convert_state_dict` could not build, for `load_into` to report


class MimiWeightsError(ValueError):
    """A checkpoint does not fit the Mimi model: lists every missing, unexpected and mis-shaped tensor."""


# transformers >= 5 in-memory names (encoder/decoder halves) -> published flat names.
_HF_NESTED = [
    (r"^encoder\.encoder_seanet\.", "encoder."),
    (r"^encoder\.encoder_transformer\.", "encoder_transformer."),
    (r"^encoder\.downsample\.", "downsample."),
    (r"^decoder\.upsample\.", "upsample."),
    (r"^decoder\.decoder_transformer\.", "decoder_transformer."),
    (r"^decoder\.decoder_seanet\.", "decoder."),
]
# published transformers names -> ours (everything else is already identical).
_HF = [
    (r"^quantizer\.semantic_residual_vector_quantizer\.(input|output)_proj\.", r"quantizer.semantic.\1_proj."),
    (r"^quantizer\.acoustic_residual_vector_quantizer\.(input|output)_proj\.", r"quantizer.acoustic.\1_proj."),
    (r"^quantizer\.semantic_residual_vector_quantizer\.layers\.(\d+)\.codebook\.(embed_sum|cluster_usage)$",
     r"quantizer.semantic.codebooks.\1.\2"),
    (r"^quantizer\.acoustic_residual_vector_quantizer\.layers\.(\d+)\.codebook\.(embed_sum|cluster_usage)$",
     r"quantizer.acoustic.codebooks.\1.\2"),
]
# Kyutai / moshi names -> ours. The fused `in_proj_weight` is split (and its q, k rows permuted) in `convert_state_dict`.
_KYUTAI = [
    (r"^(encoder|decoder)\.model\.(\d+)\.block\.(\d+)\.conv\.conv\.", r"\1.layers.\2.block.\3.conv."),
    (r"^(encoder|decoder)\.model\.(\d+)\.conv\.conv\.", r"\1.layers.\2.conv."),
    (r"^decoder\.model\.(\d+)\.convtr\.convtr\.", r"decoder.layers.\1.conv."),
    (r"^downsample\.conv\.conv\.conv\.", "downsample.conv."),
    (r"^upsample\.convtr\.convtr\.convtr\.", "upsample.conv."),
    (r"^(encoder|decoder)_transformer\.transformer\.layers\.(\d+)\.", r"\1_transformer.layers.\2."),
    (r"\.self_attn\.out_projs?(\.0)?\.weight$", ".self_attn.o_proj.weight"),  # moshi >= 0.2.6 in memory: out_projs.0
    (r"\.norm1\.", ".input_layernorm."),
    (r"\.norm2\.", ".post_attention_layernorm."),
    (r"\.linear1\.", ".mlp.fc1."),
    (r"\.linear2\.", ".mlp.fc2."),
    (r"\.layer_scale_1\.", ".self_attn_layer_scale."),
    (r"\.layer_scale_2\.", ".mlp_layer_scale."),
    (r"^quantizer\.rvq_first\.(input|output)_proj\.", r"quantizer.semantic.\1_proj."),
    (r"^quantizer\.rvq_rest\.(input|output)_proj\.", r"quantizer.acoustic.\1_proj."),
    (r"^quantizer\.rvq_first\.vq\.layers\.(\d+)\._codebook\.embedding_sum$", r"quantizer.semantic.codebooks.\1.embed_sum"),
    (r"^quantizer\.rvq_rest\.vq\.layers\.(\d+)\._codebook\.embedding_sum$", r"quantizer.acoustic.codebooks.\1.embed_sum"),
    (r"^quantizer\.rvq_first\.vq\.layers\.(\d+)\._codebook\.cluster_usage$", r"quantizer.semantic.codebooks.\1.cluster_usage"),
    (r"^quantizer\.rvq_rest\.vq\.layers\.(\d+)\._codebook\.cluster_usage$", r"quantizer.acoustic.codebooks.\1.cluster_usage"),
]
_IGNORED = re.compile(r"(^|\.)(_?initialized)$")  # k-means bookkeeping flags of both layouts


def detect_layout(keys) -> str:
    keys = list(keys)
    if any(k.startswith(("encoder.model.", "quantizer.rvq_first.")) for k in keys):
        return "kyutai"
    if any(k.startswith(("encoder.layers.", "encoder.encoder_seanet.", "quantizer.semantic_residual")) for k in keys):
        return "transformers"
    if any(k.startswith("quantizer.semantic.") for k in keys):
        return "ours"  # a csm.mimi.Mimi state_dict
    raise MimiWeightsError(f"not a Mimi checkpoint: unknown key layout (first keys: {keys[:5]})")


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _fold_weight_norm(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoints saved with weight norm: weight = g * v / |v| (norm over all dims but 0)."""
    out = dict(sd)
    for g_suffix, v_suffix in ((".weight_g", ".weight_v"),  # torch.nn.utils.weight_norm
                               (".parametrizations.weight.original0", ".parametrizations.weight.original1")):
        for g_key in [k for k in sd if k.endswith(g_suffix)]:
            base = g_key[: -len(g_suffix)]
            if base + v_suffix in sd:
                g, v = out.pop(g_key).float(), out.pop(base + v_suffix).float()
                out[base + ".weight"] = g * v / v.norm(dim=tuple(range(1, v.dim())), keepdim=True)
    return out


def _unrope_interleave(w: Tensor, heads: int) -> Tensor:
    """Rows of a q/k projection from moshi's interleaved RoPE pairs (r0 i0 r1 i1 ...) to rotate-half (r... i...)."""
    out, c = w.shape
    return w.reshape(heads, out // heads // 2, 2, c).transpose(1, 2).reshape(out, c)


def convert_state_dict(sd: dict[str, Tensor], cfg: MimiConfig) -> dict[str, Tensor]:
    """Any known layout -> our names, codebooks stacked per RVQ. Unknown keys are kept (and reported by `load_into`)."""
    if any(k.startswith(CSM_PREFIX) for k in sd):
        sd = {k[len(CSM_PREFIX):]: v for k, v in sd.items() if k.startswith(CSM_PREFIX)}
    sd = _fold_weight_norm({k: v for k, v in sd.items() if not _IGNORED.search(k)})
    layout = detect_layout(sd)
    out: dict[str, Tensor] = {}
    for key, t in sd.items():
        if layout == "kyutai":
            m = re.match(r"^(.*)\.self_attn\.(in_proj_weight|in_proj\.weight|in_projs\.0\.weight)$", key)
            if m:
                q, k, v = t.chunk(3, dim=0)
                prefix = _rename(m.group(1) + ".", _KYUTAI)
                out[prefix + "self_attn.q_proj.weight"] = _unrope_interleave(q, cfg.num_heads)
                out[prefix + "self_attn.k_proj.weight"] = _unrope_interleave(k, cfg.num_heads)
                out[prefix + "self_attn.v_proj.weight"] = v
                continue
            out[_rename(key, _KYUTAI)] = t
        elif layout == "transformers":
            out[_rename(_rename(key, _HF_NESTED), _HF)] = t
        else:
            out[key] = t
    return _stack_codebooks(out, cfg)


def _stack_codebooks(sd: dict[str, Tensor], cfg: MimiConfig) -> dict[str, Tensor]:
    for name, n in (("semantic", cfg.num_semantic), ("acoustic", cfg.num_codebooks - cfg.num_semantic)):
        pat = re.compile(rf"^quantizer\.{name}\.codebooks\.(\d+)\.(embed_sum|cluster_usage)$")
        parts: dict[int, dict[str, Tensor]] = {}
        for key in [k for k in sd if pat.match(k)]:
            i, what = pat.match(key).groups()
            parts.setdefault(int(i), {})[what] = sd.pop(key)
        if not parts:
            continue
        books = []
        for i in range(n):  # checkpoints may hold more codebooks than the model uses: the extra ones are dropped
            p = parts.get(i, {})
            if "embed_sum" not in p or "cluster_usage" not in p:
                sd[f"{_MISSING}quantizer.{name}.codebooks.{i} (embed_sum and cluster_usage; the config asks for "
                   f"{cfg.num_codebooks} codebooks)"] = torch.empty(0)
                break
            books.append(p["embed_sum"].float() / p["cluster_usage"].float().clamp(min=_EPS)[:, None])
        else:
            sd[f"quantizer.{name}.codebooks"] = torch.stack(books)
    return sd


def load_into(model: Mimi, sd: dict[str, Tensor]) -> Mimi:
    """Copy a converted state dict into `model`, or raise one error listing every problem."""
    own = model.state_dict()
    noted = [k[len(_MISSING):] for k in sd if k.startswith(_MISSING)]
    noted_stacks = {k.split(" ")[0].rsplit(".", 1)[0] for k in noted}  # their stacked tensor is missing too
    sd = {k: v for k, v in sd.items() if not k.startswith(_MISSING)}
    missing = sorted(k for k in own if k not in sd and k not in noted_stacks) + noted
    unexpected = sorted(k for k in sd if k not in own)
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} != model {tuple(own[k].shape)}"
                    for k in own if k in sd and sd[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        lines = ([f"missing ({len(missing)}): {missing}"] if missing else []) + \
                ([f"unexpected ({len(unexpected)}): {unexpected}"] if unexpected else []) + \
                ([f"wrong shape ({len(shapes)}): {shapes}"] if shapes else [])
        raise MimiWeightsError("Mimi weights do not match the model config:\n  " + "\n  ".join(lines))
    model.load_state_dict(sd, strict=True)
    return model


def read_state_dict(path: str | os.PathLike, fetch: Callable[[str], Path] | None = None) -> dict[str, Tensor]:
    """Mimi tensors of a .safetensors file, a transformers shard index (.index.json), or a weights-only torch file.

    When the file is a whole CSM checkpoint, only its `codec_model.` tensors are read (lazily, from safetensors).
    `fetch(name)` finds a shard of an index (default: next to the index file).
    """
    path = Path(path)
    if path.name.endswith(".index.json"):
        weight_map = json.loads(path.read_text())["weight_map"]
        keep = _codec_keys(weight_map)
        sd: dict[str, Tensor] = {}
        for shard in sorted({weight_map[k] for k in keep}):
            shard_path = fetch(shard) if fetch is not None else path.parent / shard
            sd.update({k: v for k, v in read_state_dict(shard_path).items() if k in keep})
        return sd
    if path.suffix in (".safetensors", ".sft"):
        from safetensors import safe_open

        from ..checkpoints import unpack_int8

        with safe_open(str(path), framework="pt") as f:
            return unpack_int8({k: f.get_tensor(k) for k in _codec_keys(list(f.keys()))})
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # moshi training checkpoints: {"model": sd}
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise MimiWeightsError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return {k: obj[k] for k in _codec_keys(list(obj))}


def _codec_keys(keys) -> set[str]:
    keys = list(keys)
    codec = [k for k in keys if k.startswith(CSM_PREFIX)]
    return set(codec or keys)


def _config_near(weights: Path, source, revision) -> dict | None:
    candidates = [weights.parent / "config.json"]
    for c in candidates:
        if c.is_file():
            return json.loads(c.read_text())
    if not Path(str(source)).expanduser().exists():  # a hub id: config.json is a separate download
        try:
            return json.loads(find_files(source, ["config.json"], revision=revision).read_text())
        except ModelFilesNotFound:
            return None
    return None


def config_from_json(cfg: dict | None) -> MimiConfig:
    """The Mimi config of a transformers config.json: `MimiModel` itself, or `codec_config` inside a CSM config."""
    if cfg is None:
        return PRESETS["kyutai/mimi"]
    if isinstance(cfg.get("codec_config"), dict):
        return MimiConfig.from_transformers(cfg["codec_config"])
    if cfg.get("model_type") in ("mimi", MEL_MODEL_TYPE):
        return MimiConfig.from_transformers(cfg)
    return PRESETS["kyutai/mimi"]


def load_mimi(
    source: str | os.PathLike = "kyutai/mimi",
    *,
    config: MimiConfig | None = None,
    num_codebooks: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
) -> Mimi:
    """Load a pretrained Mimi (eval mode) from a local file/directory or hub id.

    `source` may be: `kyutai/mimi` (transformers layout + config.json), a CSM checkpoint (`sesame/csm-1b` or its
    directory: the codec is read from the `codec_model.` tensors of model.safetensors, the config from
    `codec_config`), a directory or file holding Kyutai's `tokenizer-e351c8d8-checkpoint125.safetensors`, or any
    single weights file. Without a config.json the real `kyutai/mimi` shapes are assumed. `num_codebooks` keeps only
    the first n codebooks (default: all in the config, 32 for the published codec).
    """
    path = find_files(source, WEIGHT_CANDIDATES, revision=revision)
    if config is None:
        config = config_from_json(_config_near(path, source, revision))
    if num_codebooks is not None:
        config = config.with_codebooks(num_codebooks)
    sd = convert_state_dict(read_state_dict(path, lambda name: find_files(source, [name], revision=revision)), config)
    with torch.device("meta"):
        model = Mimi(config)
    # Module.to_empty, but allocating from shapes: empty_like of a meta tensor runs Python reference code whose first
    # use imports ~0.7 s of torch internals (a third of `csm say`'s start-up).
    model = model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    load_into(model, sd)
    return model.to(dtype=dtype).eval()


def save_mimi(model: Mimi, directory: str | os.PathLike, *, dtype: torch.dtype | None = None,
              int8: bool = False) -> Path:
    """Write `model.safetensors` (our names) + a transformers-style `config.json`; `load_mimi(directory)` reads it.
    `dtype` stores floating-point tensors in that precision (e.g. float16 to halve a shipped codec); `int8` the big
    matrices as int8 rows (`checkpoints.pack_int8`)."""
    from safetensors.torch import save_file

    from ..checkpoints import pack_int8

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
               for k, v in model.state_dict().items()}
    if int8:  # the learnt matrices; buffers (codebooks, windows, mel filters) keep `dtype`
        buffers = {name for name, _ in model.named_buffers()}
        packed = pack_int8({k: v for k, v in tensors.items() if k not in buffers})
        tensors = {**{k: v for k, v in tensors.items() if k in buffers}, **{k: v.contiguous() for k, v in packed.items()}}
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(mimi_config_json(model.cfg), indent=2) + "\n")
    return directory


def mimi_config_json(cfg: MimiConfig) -> dict:
    """A transformers-style config.json that `load_mimi` (and transformers' MimiModel) read."""
    if cfg.frontend != "seanet":  # not a transformers MimiModel: a model_type transformers will not mistake for one
        return {"model_type": MEL_MODEL_TYPE, **cfg.to_transformers(), "frame_rate": cfg.frame_rate}
    return {"model_type": "mimi", "architectures": ["MimiModel"], **cfg.to_transformers(), "frame_rate": cfg.frame_rate}


def load_model_codec(model_source: str | os.PathLike, *, device: str | torch.device = "cpu") -> Mimi | None:
    """The codec that travels with a CSM checkpoint: a `codec/` directory beside its weights, or the `codec_model.*`
    tensors of a transformers CSM checkpoint (e.g. sesame/csm-1b). None when the checkpoint carries no codec."""
    local = Path(model_source).expanduser() / "codec"
    for source in ([local] if local.is_dir() else []) + [model_source]:
        try:
            return load_mimi(source, device=device)
        except (ModelFilesNotFound, MimiWeightsError):
            continue
    return None
