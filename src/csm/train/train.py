"""The training loop: backbone and decoder trained together on prepared conversations.

Loss = cross-entropy of codebook 0 on every audio frame (EOS frames included: that is how the model learns to
stop), predicted from the previous frame's hidden state, + the decoder's cross-entropy on codebooks 1..K-1 for a
random 1/`amortization` of those frames (Sesame's compute amortisation: the decoder runs K-1 steps per frame, so
training it on every frame would dominate the cost). Each micro-batch's loss is a mean over its own frames;
gradient accumulation and processes average those means.

Single process on CPU or one GPU; several GPUs by launching the same command under torchrun (DDP, or FSDP with
--fsdp). Every `save_every` steps a checkpoint directory holds the weights in our safetensors layout (merged ones
for LoRA), the tokenizer, and train_state.pt (optimizer, step, data position) for --resume; all randomness
is derived from (seed, step, rank), so a resumed run needs no saved RNG state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoints import load_checkpoint, save_state_dict
from ..config import CSMConfig, get_config
from ..model import CSM
from . import lora as lora_lib
from .rundir import BEST, LOG_FILE, STATE_FILE, begin_checkpoint, carry_model_files, commit, find_resume_dir
from .watch import Listener, Watch
from .data import (
    TOKENIZER, Batch, Corpus, audio_targets, collate, data_dirs, decoder_frames, epoch_batches,
    load_corpus, noisy_codes, pack, shared_text_fraction, shared_tokenizer, split_examples, with_replay,
)

ADAPTERS_FILE, LORA_FILE = "adapters.safetensors", "lora.json"


@dataclass
class TrainConfig:
    data: str  # a `csm prepare` output directory, or several comma-separated (one corpus)
    out: str  # checkpoints and log.jsonl go here
    # The model: one of init (checkpoint dir / file / hub id), preset (random init), model_config (JSON, random init).
    init: str | None = None
    preset: str | None = None
    model_config: str | None = None
    resume: str | None = None  # a checkpoint directory, or "latest" (the newest one in `out`)
    # Data
    eval_data: str | None = None  # held-out prepared dir(s); default: eval_fraction of the conversations of data
    eval_fraction: float = 0.02
    # Replay: prepared dirs of the base model's own kind of data (its corpus, or any conversational speech), mixed
    # into every epoch as replay_share of the examples. A fine-tune on minutes of one voice otherwise forgets how to
    # read new text before it has learnt the voice (docs/finetune.md). Give the voice its own speaker id.
    replay: str | None = None
    replay_share: float = 0.5
    seq_len: int = 0  # frames per row; 0: the backbone's max_seq_len
    batch_size: int = 8  # rows per micro-batch (per process)
    pack: bool = True  # several conversations per row (block-diagonal attention)
    # Optimisation
    steps: int = 1000
    max_minutes: float = 0.0  # stop after this much training time (0: off); the cosine then follows time too
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    decay_steps: int = 0  # >0: constant lr, cosine to min_lr over the last N steps only (warmup-stable-decay)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: off
    grad_accum: int = 1
    amortization: int = 16  # the decoder is trained on 1/amortization of the audio frames
    decoder_loss_weight: float = 1.0
    code_noise: float = 0.0  # chance that each acoustic code the backbone reads is swapped (data.noisy_codes)
    grad_checkpointing: bool = False
    # LoRA (rank 0: full fine-tuning)
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_train_heads: bool = False
    lora_targets: str = "all"  # which linears get adapters (lora.parse_targets), e.g. "attn" or "decoder:all"
    # Runtime
    device: str | None = None  # default: cuda if available
    # Matmuls under bf16 autocast (weights and optimizer state stay float32): "auto" = on CUDA, and on CPUs with
    # AMX tiles, where bf16 steps ran 1.9x faster than float32 (this project's 2-core Xeon); "bf16"; "fp32".
    precision: str = "auto"
    fsdp: bool = False  # under torchrun: shard parameters/gradients/optimizer (FSDP2) instead of replicating (DDP)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200  # 0: only at the end
    eval_batches: int = 20
    save_every: int = 500  # 0: only at the end
    keep_checkpoints: int = 0  # keep only the newest N checkpoint directories (0: all)
    # Early stopping: each evaluation that lowers the held-out loss is saved and out/best points to it; `patience`
    # evaluations in a row without a lower loss end the run. For fine-tunes on a few minutes of audio, which
    # memorise their lines within a few hundred steps. 0: off.
    patience: int = 0
    eval_only: bool = False  # only measure the held-out loss of init / resume, into out/eval.json
    progress: bool = True  # a progress bar on stderr
    tensorboard: bool = True  # TensorBoard events in out/tb
    # At each evaluation, speak the first listen_lines lines of this text file (listen_speaker, seed 0) through
    # listen_codec: TensorBoard gets the audio and, with faster-whisper installed (`csm[eval]`), Whisper's WER.
    listen: str | None = None
    listen_codec: str | None = None
    listen_lines: int = 3
    listen_speaker: int = 0


# --- the loss -----------------------------------------------------------------------------------------------------


class CSMLoss(nn.Module):
    """The model plus its loss, so that DDP/FSDP see one forward() that does all the work."""

    def __init__(self, model: CSM, decoder_loss_weight: float = 1.0) -> None:
        super().__init__()
        self.model, self.decoder_loss_weight = model, decoder_loss_weight

    def forward(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        input_pos: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
        decoder_idx: torch.Tensor,
        backbone_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (loss, codebook-0 loss, decoder loss). decoder_idx picks among the batch's audio frames, in order.
        backbone_tokens: what the backbone reads instead of `tokens` (noisy codes); targets come from `tokens`."""
        k = self.model.cfg.audio_num_codebooks
        h, logits = self.model.backbone_forward(tokens if backbone_tokens is None else backbone_tokens, mask,
                                                input_pos, attn_mask)
        target = audio_targets(mask, k)  # hidden state t predicts audio frame t+1
        frames = tokens[:, 1:, :k][target]  # [N, K]
        c0 = F.cross_entropy(logits[:, :-1][target].float(), frames[:, 0]) if len(frames) else logits.sum() * 0
        if len(decoder_idx):
            dec_logits = self.model.decoder_logits(h[:, :-1][target][decoder_idx], frames[decoder_idx])
            dec = F.cross_entropy(dec_logits.float().flatten(0, 1), frames[decoder_idx, 1:].flatten())
        else:
            dec = c0 * 0
        return c0 + self.decoder_loss_weight * dec, c0.detach(), dec.detach()


def lr_at(cfg, step: int, time_fraction: float = 0.0) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at cfg.steps (or, with a time budget, when that is
    spent: progress is the larger of the two fractions). With cfg.decay_steps (warmup-stable-decay) the rate holds
    at cfg.lr and the cosine runs over the last decay_steps steps only: a long run at constant rate can branch a
    cooldown (resume a checkpoint into another --out) whenever a model is wanted, and go on from where it branched.
    Shared by the CSM and codec trainers."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay_steps:
        progress = min(1.0, max(0.0, (step - (cfg.steps - cfg.decay_steps)) / cfg.decay_steps))
    else:
        progress = min(1.0, max(time_fraction, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def _step_generator(seed: int, step: int, micro: int, stream: int = 0) -> torch.Generator:
    # A function of (seed, step, micro-batch) only: resumed and multi-process runs pick the same decoder frames
    # (stream 0) and noisy codes (stream 1).
    return torch.Generator().manual_seed((seed * 1_000_000_007 + step * 1_009 + micro + stream * 7_919) % 2**63)


# --- distributed ----------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None) -> tuple[Dist, torch.device]:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", d.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return d, dev


def _all_reduce(values: list[float], d: Dist, device: torch.device) -> list[float]:
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# --- model, checkpoints ---------------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig) -> CSM:
    """The starting model in float32 on the CPU: a checkpoint (--init) or a random one (--preset / --model-config)."""
    given = [x for x in (cfg.init, cfg.preset, cfg.model_config) if x]
    if len(given) != 1:
        raise ValueError("give exactly one of --init (checkpoint), --preset (random init) or --model-config (JSON)")
    if cfg.init:
        model, _ = load_checkpoint(cfg.init, dtype=torch.float32)
        return model
    if cfg.preset:
        model_cfg = get_config(cfg.preset)
    else:
        try:
            d = json.loads(Path(cfg.model_config).read_text())
            model_cfg = CSMConfig.from_dict(d.get("csm_config", d))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{cfg.model_config}: not a CSMConfig JSON (as CSMConfig.to_dict() writes it): {e}") from None
    torch.manual_seed(cfg.seed)
    return CSM(model_cfg)


def _unwrap(module: nn.Module) -> CSMLoss:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def _full_state_dict(module: nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """The CSM's complete state dict (gathered on every rank under FSDP: a collective call)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k[len("model."):]: v for k, v in sd.items()}
    return {k: v.detach() for k, v in _unwrap(module).model.state_dict().items()}


def save_training_checkpoint(
    cfg: TrainConfig, module: nn.Module, optimizer: torch.optim.Optimizer, state: dict, d: Dist, tokenizer_file: Path
) -> Path | None:
    """out/step-NNNNNN/: model.safetensors + config.json (+ adapters), tokenizer.json, train_state.pt."""
    model_cfg = _unwrap(module).model.cfg
    sd = _full_state_dict(module, cfg.fsdp)
    if cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opt_state = get_optimizer_state_dict(
            module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    else:
        opt_state = optimizer.state_dict()
    if not d.main:
        return None
    tmp = begin_checkpoint(cfg.out, state["step"])
    if cfg.lora_rank:
        from safetensors.torch import save_file

        trainable = {k for k, p in _unwrap(module).model.named_parameters() if p.requires_grad}
        adapters = {k: v for k, v in sd.items() if k in trainable}
        save_state_dict(model_cfg, lora_lib.merge_state_dict(sd, cfg.lora_alpha / cfg.lora_rank), tmp)
        save_file({k: v.contiguous().cpu() for k, v in adapters.items()}, str(tmp / ADAPTERS_FILE))
        stacks, linears = lora_lib.parse_targets(cfg.lora_targets)
        lora_meta = {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "stacks": list(stacks), "targets": list(linears),
                     "train_heads": cfg.lora_train_heads, "base": cfg.init or cfg.preset or cfg.model_config}
        (tmp / LORA_FILE).write_text(json.dumps(lora_meta, indent=2) + "\n")
    else:
        save_state_dict(model_cfg, sd, tmp)
    shutil.copy(tokenizer_file, tmp / TOKENIZER)
    carry_model_files(cfg.init, tmp, cfg.data)
    torch.save({**state, "world_size": d.world, "optimizer": opt_state, "config": dataclasses.asdict(cfg)},
               tmp / STATE_FILE)
    return commit(tmp, cfg.keep_checkpoints)


# --- evaluation ------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(module: nn.Module, corpus: Corpus, batches: list[list[list[int]]], cfg: TrainConfig, d: Dist,
             device: torch.device) -> dict[str, float]:
    """Frame-weighted mean losses over the eval batches (split across processes); fixed decoder frames."""
    # Under DDP the bare module avoids collectives; FSDP needs every rank in every forward, so ranks with fewer
    # batches run batch 0 again with weight 0.
    module = _unwrap(module)
    module.eval()
    k = module.model.cfg.audio_num_codebooks
    sums = [0.0, 0.0, 0.0, 0.0]
    bf16 = uses_bf16(device, cfg.precision)
    for i in range(d.rank, math.ceil(len(batches) / d.world) * d.world, d.world):
        batch = collate(corpus, batches[i if i < len(batches) else 0])
        n = int(audio_targets(batch.mask, k).sum())
        idx = decoder_frames(n, cfg.amortization, _step_generator(cfg.seed, -1, i))
        with _autocast(device, bf16):
            loss, c0, dec = module(*_inputs(batch.to(device)), idx.to(device))
        n = n if i < len(batches) else 0
        sums = [sums[0] + n * loss.item(), sums[1] + n * c0.item(), sums[2] + n * dec.item(), sums[3] + n]
    module.train()
    total = _all_reduce(sums, d, device)
    n = max(total[3], 1)
    return {"eval_loss": total[0] / n, "eval_c0_loss": total[1] / n, "eval_decoder_loss": total[2] / n}


def _inputs(batch: Batch) -> tuple:
    return batch.tokens, batch.mask, batch.input_pos, batch.attn_mask


PRECISIONS = ("auto", "bf16", "fp32")


def uses_bf16(device: torch.device, precision: str) -> bool:
    """Whether TrainConfig.precision means bf16 autocast on this device."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":  # without AMX a CPU emulates bf16 matmuls, slower than float32
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)  # private: absent from older torch
        return device.type == "cuda" or (device.type == "cpu" and amx())
    return precision == "bf16"


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


# --- data, model setup -------------------------------------------------------------------------------------------


def load_data(
    cfg: TrainConfig, model_cfg: CSMConfig, seq_len: int, verbose: bool = True
) -> tuple[Corpus, list[int], list[int], Corpus, list]:
    """(train corpus, its training example ids, its replay example ids, eval corpus, eval batches) checked
    against the model. Replay examples are never held out: the eval loss is the fine-tune's own data."""
    dirs = data_dirs(cfg.data)
    replay_dirs = data_dirs(cfg.replay) if cfg.replay else []
    if replay_dirs:
        if not 0 < cfg.replay_share < 1:
            raise ValueError(f"--replay-share must be in (0, 1), got {cfg.replay_share}")
        shared_tokenizer(dirs + replay_dirs)
    corpus = load_corpus(dirs + replay_dirs, seq_len, model_cfg.audio_num_codebooks)
    _check_vocab(corpus, model_cfg, cfg.data)
    own = [i for i, k in enumerate(corpus.sources) if k < len(dirs)]
    replay_ids = [i for i, k in enumerate(corpus.sources) if k >= len(dirs)]
    if cfg.eval_data:
        eval_dirs = data_dirs(cfg.eval_data)
        shared_tokenizer(dirs + eval_dirs)
        eval_corpus = load_corpus(eval_dirs, seq_len, model_cfg.audio_num_codebooks)
        _check_vocab(eval_corpus, model_cfg, cfg.eval_data)
        train_ids, eval_ids = own, list(range(len(eval_corpus.examples)))
    else:
        eval_corpus = corpus
        train_ids, eval_ids = split_examples(corpus, cfg.eval_fraction, cfg.seed, own)
    shared = shared_text_fraction(corpus, train_ids, eval_corpus, eval_ids) if eval_ids else 0.0
    if shared > 0.1 and verbose:
        print(f"warning: {100 * shared:.0f}% of the held-out utterances have a text (and speaker) that also occurs "
              "in the training data, so the eval loss partly measures memorised lines; for a templated corpus give "
              "--eval-data with unseen sentences", flush=True)
    eval_rows = pack(eval_ids, eval_corpus.lengths, seq_len, cfg.pack)
    eval_batches = [eval_rows[i : i + cfg.batch_size] for i in range(0, len(eval_rows), cfg.batch_size)]
    return corpus, train_ids, replay_ids, eval_corpus, eval_batches[: cfg.eval_batches]


def wrap(model: CSM, cfg: TrainConfig, d: Dist, device: torch.device) -> nn.Module:
    """CSMLoss around the model; under torchrun replicated by DDP or sharded per block by FSDP2."""
    model.backbone.gradient_checkpointing = model.decoder.gradient_checkpointing = cfg.grad_checkpointing
    model.to(device).train()
    module = CSMLoss(model, cfg.decoder_loss_weight)
    if d.world > 1 and cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in [*model.backbone.layers, *model.decoder.layers]:
            fully_shard(block)
        fully_shard(module)  # the root: embeddings, heads, norms
    elif d.world > 1:
        module = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    return module


# --- the loop ----------------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> list[dict]:
    """Run training as configured; returns the logged records (also in out/log.jsonl)."""
    d, device = setup_distributed(cfg.device)
    if cfg.fsdp and d.world == 1:
        cfg = dataclasses.replace(cfg, fsdp=False)  # nothing to shard in one process
    out = Path(cfg.out)
    if cfg.grad_accum < 1 or cfg.batch_size < 1 or cfg.amortization < 1:
        raise ValueError("batch_size, grad_accum and amortization must be >= 1")
    if not 0 <= cfg.code_noise <= 1:
        raise ValueError(f"code_noise must be in [0, 1], got {cfg.code_noise}")
    bf16 = uses_bf16(device, cfg.precision)  # checks the value before any work
    tokenizer_file = shared_tokenizer(data_dirs(cfg.data))

    resume_dir = find_resume_dir(cfg.resume, cfg.out) if cfg.resume else None
    state = torch.load(resume_dir / STATE_FILE, weights_only=True) if resume_dir else None
    if state is not None and state["config"].get("lora_rank", 0) != cfg.lora_rank:
        raise ValueError(f"{resume_dir} was trained with --lora-rank {state['config'].get('lora_rank', 0)}; "
                         f"resume with the same value")
    if resume_dir and not cfg.lora_rank:
        model, _ = load_checkpoint(resume_dir, dtype=torch.float32)  # the exact float32 weights saved
    else:
        model = build_model(cfg)
    model_cfg = model.cfg
    seq_len = cfg.seq_len or model_cfg.backbone.max_seq_len
    if seq_len > model_cfg.backbone.max_seq_len:
        raise ValueError(f"--seq-len {seq_len} exceeds the backbone's max_seq_len {model_cfg.backbone.max_seq_len}")

    corpus, train_ids, replay_ids, eval_corpus, eval_batches = load_data(cfg, model_cfg, seq_len, d.main)

    def batches_of(epoch: int) -> list[list[list[int]]]:
        examples = with_replay(train_ids, replay_ids, cfg.replay_share, cfg.seed, epoch)
        return epoch_batches(examples, corpus.lengths, seq_len, cfg.batch_size, cfg.seed, epoch, cfg.pack)

    per_step = d.world * cfg.grad_accum
    n_batches = len(batches_of(0))
    if n_batches < per_step:
        raise ValueError(
            f"an epoch holds {n_batches} batches of {cfg.batch_size} rows but one step needs {per_step} "
            f"(grad_accum x processes): use a smaller --batch-size / --grad-accum or more data"
        )

    if cfg.lora_rank:
        torch.manual_seed(cfg.seed)  # same adapter init on every rank and every resume
        n_train = lora_lib.apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_train_heads,
                                      cfg.lora_targets)
        if resume_dir:
            from safetensors.torch import load_file

            adapters = load_file(str(resume_dir / ADAPTERS_FILE))
            missing = model.load_state_dict(adapters, strict=False)
            if missing.unexpected_keys or set(adapters) != {k for k, p in model.named_parameters() if p.requires_grad}:
                raise ValueError(f"{resume_dir / ADAPTERS_FILE} does not match this LoRA configuration")
    else:
        n_train = model.num_parameters()
    module = wrap(model, cfg, d, device)
    if cfg.eval_only:  # before the optimizer: nothing of it (or of its saved state) is needed
        if not eval_batches:
            raise ValueError("--eval-only needs held-out data: --eval-data or --eval-fraction > 0")
        record = {"step": state["step"] if state else 0, "checkpoint": str(resume_dir or cfg.init or "random init"),
                  **evaluate(module, eval_corpus, eval_batches, cfg, d, device)}
        if d.main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "eval.json").write_text(json.dumps(record, indent=1) + "\n")
            print(json.dumps(record), flush=True)
        return [record]
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # no decay on norms
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")

    step, epoch, pos, train_seconds = 0, 0, 0, 0.0
    best = {"loss": float("inf"), "stale": 0}  # early stopping (cfg.patience): the lowest held-out loss so far
    if state is not None:
        step, epoch, pos = state["step"], state["epoch"], state["pos"]
        train_seconds = state.get("train_seconds", 0.0)
        best = state.get("best", best)
        _warn_if_data_order_changes(state, cfg, d)
        if state["config"].get("fsdp", False) != cfg.fsdp:  # the two store the optimizer state differently
            raise ValueError(f"{resume_dir} was saved {'with' if state['config'].get('fsdp') else 'without'} FSDP "
                             f"sharding: resume it the same way (--fsdp under torchrun, or not)")
        if cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(module, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])

    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        mode = f"LoRA r={cfg.lora_rank}" if cfg.lora_rank else "full"
        print(f"csm train: {model.num_parameters() / 1e6:.1f}M parameters ({n_train / 1e6:.2f}M trained, {mode}); "
              f"{len(train_ids)} train examples"
              + (f" (+{len(replay_ids)} to replay, {cfg.replay_share:.0%} of each epoch)" if replay_ids else "")
              + f", {sum(map(len, eval_batches))} eval rows ({corpus.skipped} utterances over {seq_len} "
              f"frames skipped); {n_batches} batches per epoch; {d.world} process(es) on {device}, "
              f"{'bf16 autocast' if bf16 else 'float32'}"
              + (f"; resuming at step {step} from {resume_dir}" if resume_dir else ""), flush=True)

    records: list[dict] = []
    watch = Watch(out, cfg.steps, step, "train", cfg.progress, cfg.tensorboard, enabled=d.main)
    listener = None
    if cfg.listen and d.main:
        if not cfg.listen_codec:
            raise ValueError("--listen needs --listen-codec: the codec the data was prepared with")
        listener = Listener(cfg.listen, cfg.listen_lines, cfg.listen_codec, tokenizer_file, cfg.init, device,
                            cfg.listen_speaker)
    batches = batches_of(epoch)
    k = model_cfg.audio_num_codebooks
    window = {"loss": 0.0, "c0": 0.0, "dec": 0.0, "frames": 0, "steps": 0, "t": time.perf_counter()}
    last_saved = step if resume_dir else -1
    budget, out_of_time = cfg.max_minutes * 60, False
    while step < cfg.steps and not out_of_time:
        t_step = time.perf_counter()
        for _ in range(100):  # an epoch's leftover batches are dropped: all ranks move on together
            if pos + per_step <= len(batches):
                break
            epoch, pos = epoch + 1, 0
            batches = batches_of(epoch)
        else:  # packing differs a little between shuffles; tiny data sets can come up short every time
            raise ValueError(f"the epochs hold fewer batches than one step needs ({per_step}): use more data")
        # All randomness is a function of (seed, step, rank): the data order and decoder frames through their own
        # generators, anything else (LoRA dropout) through this seed. So --resume needs no saved RNG state.
        torch.manual_seed((cfg.seed * 1_000_003 + step * 1_009 + d.rank) % 2**63)
        lr = lr_at(cfg, step, train_seconds / budget if budget else 0.0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(cfg.grad_accum):
            global_micro = micro * d.world + d.rank
            batch = collate(corpus, batches[pos + global_micro])
            n_audio = int(audio_targets(batch.mask, k).sum())
            idx = decoder_frames(n_audio, cfg.amortization, _step_generator(cfg.seed, step, global_micro))
            noisy = noisy_codes(batch.tokens, batch.mask, k, cfg.code_noise,
                                _step_generator(cfg.seed, step, global_micro, stream=1)) if cfg.code_noise else None
            last = micro == cfg.grad_accum - 1
            # Reduce gradients across processes only after the last micro-batch.
            sync = module.no_sync() if isinstance(module, nn.parallel.DistributedDataParallel) and not last \
                else contextlib.nullcontext()
            if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
                module.set_requires_gradient_sync(last)
            with sync:
                with _autocast(device, bf16):
                    loss, c0, dec = module(*_inputs(batch.to(device)), idx.to(device),
                                           None if noisy is None else noisy.to(device))
                (loss / cfg.grad_accum).backward()
            window["loss"] += loss.detach() / cfg.grad_accum
            window["c0"] += c0 / cfg.grad_accum
            window["dec"] += dec / cfg.grad_accum
            window["frames"] += batch.num_frames
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step, pos = step + 1, pos + per_step
        window["steps"] += 1
        watch.step()
        train_seconds += time.perf_counter() - t_step
        if budget:  # every process stops at the same step
            out_of_time = _all_reduce([float(train_seconds >= budget)], d, device)[0] > 0
        last = step == cfg.steps or out_of_time

        record = None
        if step % cfg.log_every == 0 or last:
            n = window["steps"]
            loss_v, c0_v, dec_v, frames = _all_reduce(
                [float(window["loss"]) / n, float(window["c0"]) / n, float(window["dec"]) / n, window["frames"]], d, device)
            elapsed = time.perf_counter() - window["t"]
            gn = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            record = {"step": step, "epoch": epoch, "loss": loss_v / d.world, "c0_loss": c0_v / d.world,
                      "decoder_loss": dec_v / d.world, "lr": lr, "grad_norm": float(gn),
                      "frames_per_s": frames / max(elapsed, 1e-9)}
            window = {"loss": 0.0, "c0": 0.0, "dec": 0.0, "frames": 0, "steps": 0, "t": time.perf_counter()}
        paused = time.perf_counter()
        evaluating = (cfg.eval_every and step % cfg.eval_every == 0) or last
        improved = stop_early = False
        if eval_batches and evaluating:
            record = {"step": step, **(record or {}), **evaluate(module, eval_corpus, eval_batches, cfg, d, device)}
            if cfg.patience:
                improved = record["eval_loss"] < best["loss"]
                best = {"loss": record["eval_loss"], "stale": 0} if improved else {**best, "stale": best["stale"] + 1}
                stop_early = best["stale"] >= cfg.patience
        if listener is not None and evaluating:
            record = {"step": step, **(record or {}), **listener(_unwrap(module).model, watch, step)}
        if record is not None:
            records.append(record)
            if d.main:
                _log(out, record, watch)
        if ((cfg.save_every and step % cfg.save_every == 0) or last or improved or stop_early) and step != last_saved:
            progress = {"step": step, "epoch": epoch, "pos": pos, "train_seconds": train_seconds, "best": best}
            path = save_training_checkpoint(cfg, module, optimizer, progress, d, tokenizer_file)
            last_saved = step
            if d.main:
                watch.print(f"saved {path}")
            if d.world > 1:
                dist.barrier()
        if improved and d.main:
            link = out / BEST
            link.unlink(missing_ok=True)
            link.symlink_to(f"step-{step:06d}", target_is_directory=True)
        if stop_early:
            if d.main:
                watch.print(f"stopping: no lower held-out loss in {cfg.patience} evaluations; the best checkpoint is "
                            f"{(out / BEST).resolve() if (out / BEST).exists() else 'none'}")
            break
        window["t"] += time.perf_counter() - paused  # throughput counts training time only
    watch.close()
    return records


def _log(out: Path, record: dict, watch: Watch) -> None:
    with open(out / LOG_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    parts = [f"step {record['step']}"]
    for key, fmt in (("loss", ".4f"), ("c0_loss", ".4f"), ("decoder_loss", ".4f"), ("lr", ".2e"), ("grad_norm", ".2f"),
                     ("frames_per_s", ".0f"), ("eval_loss", ".4f"), ("listen_wer", ".3f")):
        if key in record:
            parts.append(f"{key} {record[key]:{fmt}}")
    watch.print(" | ".join(parts))
    watch.scalars(record["step"], record)


def _warn_if_data_order_changes(state: dict, cfg: TrainConfig, d: Dist) -> None:
    defaults = dataclasses.asdict(TrainConfig(data="", out=""))  # for fields newer than the checkpoint
    saved = {**defaults, **state["config"], "world_size": state.get("world_size", 1)}
    now = {**dataclasses.asdict(cfg), "world_size": d.world}
    changed = [k for k in ("seed", "batch_size", "grad_accum", "seq_len", "pack", "world_size", "eval_fraction", "data",
                           "replay", "replay_share")
               if saved.get(k) != now[k]]
    if changed and d.main:
        print(f"warning: resuming with different {', '.join(changed)}: the data order will differ from the "
              f"uninterrupted run", flush=True)


def _check_vocab(corpus: Corpus, model_cfg: CSMConfig, data_dir: str) -> None:
    max_text = max(int(u.text.max()) for u in corpus.utterances)
    max_code = max(int(u.codes.max()) for u in corpus.utterances)
    if max_text >= model_cfg.text_vocab_size:
        raise ValueError(f"{data_dir} holds text token id {max_text} but the model's text_vocab_size is "
                         f"{model_cfg.text_vocab_size}: prepare the data with the model's tokenizer")
    if max_code >= model_cfg.audio_vocab_size:
        raise ValueError(f"{data_dir} holds audio code {max_code} but the model's audio_vocab_size is "
                         f"{model_cfg.audio_vocab_size}")
