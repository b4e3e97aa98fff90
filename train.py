"""
The experiment: a small GPT trained for a fixed time budget, then scored by val_bpb.

This is the one file the agent edits: model, optimizer, schedule, hyperparameters. The data,
the budget and the metric come from prepare.py, which nobody edits.

Usage:
    uv run train.py                        # after `uv run prepare.py` (or `--dataset builtin`)
    AUTORESEARCH_SEED=7 uv run train.py    # the same experiment under another seed
    uv run python -m torch.distributed.run --standalone --nproc_per_node=8 train.py   # 8 GPUs, one experiment

It prints progress, then ends with the `---` summary block that the helpers parse
(`grep "^val_bpb:" run.log`). Exit code 3 means the loss went NaN or exploded (fast fail).
Under the helpers the evaluation data is out of reach: the block then says `evaluation: referee`,
and the helper appends the referee's val_bpb, scored from the model saved here, to run.log.
"""

import gc
import math
import os
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

# prepare first: it sets OpenMP's wait policy, which must be in place before torch loads OpenMP
from prepare import (CPU_PROFILES, MAX_SEQ_LEN, PROFILE, TIME_BUDGET, TRAIN_TOKENS, VOCAB_SIZE, budget_text, detect_device,
                     evaluate_and_save, make_dataloader, manifest, peak_flops, run_seed, training_clock)

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------
# Hyperparameters: edit freely. DEPTH sizes the model; width and heads follow from it.
# ---------------------------------------------------------------------------

DEPTH = 8                   # transformer blocks
ASPECT_RATIO = 64           # model width per block of depth (width = DEPTH * ASPECT_RATIO, rounded up to HEAD_DIM)
HEAD_DIM = 128              # attention head size; heads = width // HEAD_DIM
WINDOW_PATTERN = "SSSL"     # attention span per block, repeating: S = half context (sliding), L = full; the last block is always L
TOTAL_BATCH_SIZE = 2**19    # tokens per optimizer step; gradient accumulation makes up what one pass lacks
DEVICE_BATCH_SIZE = 128     # sequences per forward pass; halve it when memory runs out
EMBEDDING_LR = 0.6          # AdamW: token and value embeddings
UNEMBEDDING_LR = 0.004      # AdamW: the output head
MATRIX_LR = 0.04            # Muon: every 2-D weight inside the blocks
SCALAR_LR = 0.5             # AdamW: per-block residual and x0 mixing scalars
WEIGHT_DECAY = 0.2          # Muon's cautious weight decay, decayed linearly to 0 over the budget
ADAM_BETAS = (0.8, 0.95)    # AdamW betas
WARMUP_RATIO = 0.0          # fraction of the budget spent ramping the learning rate up
WARMDOWN_RATIO = 0.5        # fraction of the budget spent decaying it to FINAL_LR_FRAC
FINAL_LR_FRAC = 0.0         # learning rate at the end, as a fraction of the peak
LOGIT_SOFTCAP = 15.0        # logits pass through softcap * tanh(logits / softcap)

# The cpu profiles (2 cores, 2^19 tokens: cpu, golf-cpu) need a far smaller model and batch to learn at all.
# On them these values replace the ones above, so they are the ones to tune on a CPU.
if PROFILE in CPU_PROFILES:
    DEPTH = 2
    HEAD_DIM = 64
    TOTAL_BATCH_SIZE = 2**13
    DEVICE_BATCH_SIZE = 32
    EMBEDDING_LR = 0.3
    MATRIX_LR = 0.03

# The golf profile (parameter golf: 8 GPUs, 600 s, vocabulary 1024): the artifact must stay under
# 16,000,000 bytes, and int8 weights cost about a byte per parameter. DEPTH 8 is 28.3 M parameters;
# DEPTH 6 (width 384) is 12.6 M, which leaves room for code, scales and a larger idea.
if PROFILE == "golf":
    DEPTH = 6

VE_GATE_CHANNELS = 32       # value-embedding gates read this many leading channels of the block input
FAST_FAIL_LOSS = 100.0      # a training loss above this (or NaN) ends the run at once with exit code 3

# ---------------------------------------------------------------------------
# Model: rotary, QK-norm, ReLU^2 MLP, gated value embeddings, x0 mixing, soft-capped logits
# ---------------------------------------------------------------------------


@dataclass
class GPTConfig:
    sequence_len: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    window_pattern: str


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def has_value_embedding(layer, n_layer):
    """Value embeddings on alternating blocks, always including the last one."""
    return layer % 2 == (n_layer - 1) % 2


def rotary_tables(seq_len, head_dim, device, base=10000.0):
    inverse_frequency = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inverse_frequency)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]  # (1, T, 1, head_dim / 2)


def apply_rotary(x, cos, sin):
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def window_sizes(config):
    spans = {"S": config.sequence_len // 2, "L": config.sequence_len}
    sizes = [spans[config.window_pattern[i % len(config.window_pattern)]] for i in range(config.n_layer)]
    sizes[-1] = config.sequence_len  # the last block sees the whole context
    return sizes


def sliding_window(window):
    """FlexAttention mask: a query sees itself and the window - 1 positions before it."""
    def mask(batch, head, query, key):
        return (query >= key) & (query - key < window)
    return mask


def use_flex_attention(device):
    """FlexAttention on CUDA: compiled with the model, so skipped blocks cost nothing. Not while
    the model is exported for the referee: torch.export cannot save it (SerializeError), so the
    saved model takes the boolean-mask path, the same attention."""
    return device.type == "cuda" and not torch.compiler.is_exporting()


def causal_attention(window, seq_len, device, flex=False):
    """Causal attention over at most `window` past positions, with PyTorch's own kernels:
    full windows use SDPA's causal path (flash attention on CUDA); sliding windows use a
    FlexAttention block mask when `flex` and a boolean mask with SDPA otherwise."""
    if window >= seq_len:
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        block_mask = create_block_mask(sliding_window(window), B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device)
        return lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask)
    position = torch.arange(seq_len, device=device)
    distance = position[:, None] - position[None, :]
    mask = (distance >= 0) & (distance < window)
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_v = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, config.n_head, bias=False) \
            if has_value_embedding(layer, config.n_layer) else None

    def forward(self, x, value_embedding, rotary, attend):
        batch, seq, width = x.shape
        q = self.c_q(x).view(batch, seq, self.n_head, self.head_dim)
        k = self.c_k(x).view(batch, seq, self.n_head, self.head_dim)
        v = self.c_v(x).view(batch, seq, self.n_head, self.head_dim)
        if value_embedding is not None:
            # each head mixes in a per-token embedding, through a gate in (0, 2) that starts at 1
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * value_embedding.view(batch, seq, self.n_head, self.head_dim)
        cos, sin = rotary
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))  # QK-norm
        y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.c_proj(y.transpose(1, 2).reshape(batch, seq, width))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU^2


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, value_embedding, rotary, attend):
        x = x + self.attn(norm(x), value_embedding, rotary, attend)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.value_embeds = nn.ModuleDict({str(layer): nn.Embedding(config.vocab_size, config.n_embd)
                                           for layer in range(config.n_layer)
                                           if has_value_embedding(layer, config.n_layer)})
        self.windows = window_sizes(config)
        self._attention = {}

    @torch.no_grad()
    def init_weights(self):
        width = self.config.n_embd
        bound = 3**0.5 * width**-0.5  # uniform with std 1/sqrt(width)
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)  # every block starts as the identity
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        for embedding in self.value_embeds.values():
            nn.init.uniform_(embedding.weight, -bound, bound)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)

    def attention_functions(self, seq_len, device):
        """One attention function per block for this sequence length (block masks built once)."""
        flex = use_flex_attention(device)
        key = (seq_len, device, flex)
        if key not in self._attention:
            head_dim = self.config.n_embd // self.config.n_head
            built = {window: causal_attention(window, seq_len, device, flex) for window in set(self.windows)}
            self._attention[key] = ([built[window] for window in self.windows],
                                    rotary_tables(seq_len, head_dim, device))
        return self._attention[key]

    def forward(self, idx, targets=None):
        attends, rotary = self.attention_functions(idx.size(1), idx.device)
        x = norm(self.wte(idx))
        x0 = x
        for layer, block in enumerate(self.blocks):
            x = self.resid_lambdas[layer] * x + self.x0_lambdas[layer] * x0
            value_embedding = self.value_embeds[str(layer)](idx) if str(layer) in self.value_embeds else None
            x = block(x, value_embedding, rotary, attends[layer])
        logits = self.lm_head(norm(x)).float()
        logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))

    def count_parameters(self):
        total = sum(p.numel() for p in self.parameters())
        embeddings = self.wte.weight.numel() + sum(e.weight.numel() for e in self.value_embeds.values())
        return total, total - embeddings

    def flops_per_token(self, causal=True):
        """Training FLOPs per token: 6 per weight outside the embeddings, plus attention scores
        and values, 12 * width per attended position and block: on average over the causal
        positions (what the kernels compute), or with causal=False over the whole window, as
        upstream counts it (about 10% more at seq 2048, so its MFU reads higher at equal speed)."""
        _, dense = self.count_parameters()
        width, seq = self.config.n_embd, self.config.sequence_len
        if causal:
            return 6 * dense + sum(12 * width * sum(min(p + 1, w) for p in range(seq)) / seq for w in self.windows)
        scalars = self.resid_lambdas.numel() + self.x0_lambdas.numel()
        return 6 * (dense - scalars) + sum(12 * width * min(w, seq) for w in self.windows)


# ---------------------------------------------------------------------------
# Optimizer: Muon for the matrices inside the blocks, AdamW for everything else
# ---------------------------------------------------------------------------

# Polar Express (Amsel et al. 2025, arXiv:2505.16932): per-iteration odd-polynomial coefficients
# that drive every singular value to 1 faster than Newton-Schulz's fixed ones, computed with a
# 2% safety margin. Five iterations, as in modded-nanogpt and upstream autoresearch.
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def orthogonalize(G):
    """Nearest semi-orthogonal matrix to each G[i] (batched over the leading dimension).
    bf16 on CUDA (the iteration tolerates it and it is twice as fast), float32 elsewhere."""
    X = G.bfloat16() if G.is_cuda else G.float()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT  # iterate on the wide side: X @ X^T is then the small Gram matrix
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFICIENTS:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return (X.mT if tall else X).to(G.dtype)


class MuonAdamW:
    """Each param group has kind "muon" or "adamw".

    Muon: Nesterov momentum, Polar Express orthogonalisation, NorMuon variance reduction
    (a per-row second moment that evens out the update's rows, then the update's norm restored),
    and cautious weight decay (decay only where the update and the weight agree in sign).
    Same-shape matrices are stacked so one batched matmul serves them all.
    AdamW: the textbook algorithm with decoupled weight decay, exactly as torch.optim.AdamW.
    A plain class: torch.optim.Optimizer would import torch._dynamo (and triton) even on a CPU."""

    def __init__(self, param_groups):
        self.param_groups = [dict(group, params=list(group["params"])) for group in param_groups]
        self.state = {}

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon_step(group)
            else:
                self._adamw_step(group)

    def _adamw_step(self, group):
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state.setdefault(p, {})
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            bias_correction1 = 1 - beta1 ** state["step"]
            bias_correction2 = 1 - beta2 ** state["step"]
            p.mul_(1 - group["lr"] * group["weight_decay"])
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denominator = (state["exp_avg_sq"].sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
            p.addcdiv_(state["exp_avg"], denominator, value=-group["lr"] / bias_correction1)

    def _muon_step(self, group):
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        state = self.state.setdefault(params[0], {})  # the group's stacked state lives with its first parameter
        grads = torch.stack([p.grad for p in params])
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(grads)
            state["second_moment"] = torch.zeros(grads.shape[:-1] + (1,), device=grads.device, dtype=torch.float32)
        momentum = group["momentum"]
        state["momentum"].lerp_(grads, 1 - momentum)
        update = orthogonalize(grads.lerp(state["momentum"], momentum)).float()  # Nesterov
        # NorMuon: normalise each row by its running RMS, then restore the overall norm.
        state["second_moment"].lerp_(update.square().mean(dim=-1, keepdim=True), 1 - group["beta2"])
        normalised = update / (state["second_moment"].sqrt() + 1e-10)
        update = normalised * (update.norm(dim=(-2, -1), keepdim=True)
                               / normalised.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))
        rows, cols = params[0].shape
        lr = group["lr"] * max(1.0, rows / cols) ** 0.5
        for p, u in zip(params, update):
            agree = (u * p) > 0
            p.sub_(group["lr"] * group["weight_decay"] * p * agree)
            p.sub_(lr * u.to(p.dtype))


def build_optimizer(model):
    width = model.config.n_embd
    scale = (width / 768) ** -0.5  # AdamW rates were tuned at width 768; scale like 1/sqrt(width)
    matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
    adamw = dict(kind="adamw", betas=ADAM_BETAS, eps=1e-10, weight_decay=0.0)
    groups = [
        dict(adamw, params=[model.wte.weight, *[e.weight for e in model.value_embeds.values()]],
             lr=EMBEDDING_LR * scale),
        dict(adamw, params=[model.lm_head.weight], lr=UNEMBEDDING_LR * scale),
        dict(adamw, params=[model.resid_lambdas], lr=SCALAR_LR * 0.01),
        dict(adamw, params=[model.x0_lambdas], lr=SCALAR_LR),
    ]
    for shape in sorted({tuple(p.shape) for p in matrices}):
        groups.append(dict(kind="muon", params=[p for p in matrices if tuple(p.shape) == shape],
                           lr=MATRIX_LR, momentum=0.95, beta2=0.95, weight_decay=WEIGHT_DECAY))
    for group in groups:
        group["initial_lr"] = group["lr"]
    return MuonAdamW(groups)


def learning_rate_multiplier(progress):
    """Warmup, constant, then linear warmdown to FINAL_LR_FRAC, as fractions of the budget."""
    if progress < WARMUP_RATIO:
        return (progress + 1e-8) / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    fraction_left = (1.0 - progress) / WARMDOWN_RATIO
    return fraction_left + (1 - fraction_left) * FINAL_LR_FRAC


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

def warn(message):
    bar = "!" * 78
    print(f"{bar}\nWARNING: {message}\n{bar}", flush=True)


def start_distributed(device):
    """(rank, world_size, device): under torchrun (which sets RANK, WORLD_SIZE and LOCAL_RANK)
    one process per GPU joins a process group, NCCL on CUDA and gloo on the CPU; otherwise (0, 1,
    device) and nothing changes. Only rank 0 prints: the others' stdout goes to /dev/null (their
    errors still reach stderr, and torchrun ends every rank when one fails)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    import torch.distributed as dist
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank, local_world_size = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        # The cores are shared out: 2 ranks on 2 cores run one thread each, as one process runs two.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world_size))
        dist.init_process_group("gloo")
    if rank:
        sys.stdout = open(os.devnull, "w")
    return rank, world_size, device


def combine_ranks(loss, seconds, world_size, device):
    """One step's mean loss over the ranks and what it costs the budget, the same numbers on every
    rank (an all-reduce), so that every rank sets the same learning rate, fails fast together and
    stops after the same step. On the cpu profile the budget is CPU time, and the ranks' CPU seconds
    add up: 2 one-thread ranks get the compute one 2-thread process gets. Wall time passes for all
    ranks at once: the mean of theirs."""
    import torch.distributed as dist
    both = torch.tensor([loss, seconds], dtype=torch.float64, device=device)
    dist.all_reduce(both)
    loss_sum, seconds_sum = both.tolist()
    return loss_sum / world_size, seconds_sum if PROFILE in CPU_PROFILES else seconds_sum / world_size


def end_distributed():
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()


def budget_left(step, training_seconds):
    if TRAIN_TOKENS:
        return f"{max(TRAIN_TOKENS - step * TOTAL_BATCH_SIZE, 0):,} tokens"
    return f"{max(TIME_BUDGET - training_seconds, 0):.0f}s"


def main():
    started = time.time()
    seed = run_seed()
    torch.manual_seed(seed)
    rank, world_size, device = start_distributed(detect_device())
    distributed = "RANK" in os.environ
    on_cuda = device.type == "cuda"
    use_bf16 = on_cuda and torch.cuda.is_bf16_supported()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()
    if on_cuda:
        torch.set_float32_matmul_precision("high")  # TF32 for whatever autocast leaves in float32
        if not use_bf16:
            warn("this GPU has no bf16: training in float32, much slower than it could be")

    width = math.ceil(DEPTH * ASPECT_RATIO / HEAD_DIM) * HEAD_DIM
    config = GPTConfig(sequence_len=MAX_SEQ_LEN, vocab_size=VOCAB_SIZE, n_layer=DEPTH,
                       n_head=width // HEAD_DIM, n_embd=width, window_pattern=WINDOW_PATTERN)
    with torch.device(device):
        model = GPT(config)
    model.init_weights()
    total_params, dense_params = model.count_parameters()
    optimizer = build_optimizer(model)
    model.attention_functions(MAX_SEQ_LEN, model.wte.weight.device)  # block masks built before compiling
    forward = torch.compile(model, dynamic=False) if on_cuda else model
    train_forward = forward
    if distributed:
        from torch.nn.parallel import DistributedDataParallel
        # DDP averages the gradients over the ranks, so every rank's Muon and AdamW take the same
        # step from the same gradient and the weights stay identical (tests/test_ddp.py checks it)
        train_forward = DistributedDataParallel(forward, device_ids=[device.index] if on_cuda else None)

    # Each rank runs its share of the batch: fewer accumulation passes, or, when one pass per rank is
    # already more than its share, a smaller pass (the cpu profile's 32 rows on 2 ranks: 16 each).
    device_batch_size = DEVICE_BATCH_SIZE if world_size == 1 else \
        min(DEVICE_BATCH_SIZE, max(TOTAL_BATCH_SIZE // (world_size * MAX_SEQ_LEN), 1))
    tokens_per_pass = world_size * device_batch_size * MAX_SEQ_LEN
    if TOTAL_BATCH_SIZE % tokens_per_pass:
        raise SystemExit(f"TOTAL_BATCH_SIZE {TOTAL_BATCH_SIZE} is not a multiple of world size * DEVICE_BATCH_SIZE * MAX_SEQ_LEN = {tokens_per_pass}")
    accumulation = TOTAL_BATCH_SIZE // tokens_per_pass
    flops_per_token, upstream_flops_per_token = model.flops_per_token(), model.flops_per_token(causal=False)
    peak, mfu_basis = peak_flops(device)
    if peak:
        peak *= world_size  # MFU of the whole job: every rank's GPU counts
    # The first steps compile kernels (CUDA) or warm caches; they are not charged to the budget.
    untimed_steps = 10 if on_cuda else 1
    print(f"device {device} ({'bf16, compiled' if use_bf16 else 'float32, eager'}), profile {PROFILE}, seed {seed}")
    print(f"model: depth {DEPTH}, width {width}, heads {config.n_head}, windows {model.windows}, "
          f"{total_params / 1e6:.1f}M parameters ({dense_params / 1e6:.1f}M outside embeddings)")
    ranks = f" x {world_size} ranks" if world_size > 1 else ""
    print(f"batch: {TOTAL_BATCH_SIZE:,} tokens per step = {accumulation} x {device_batch_size} x {MAX_SEQ_LEN}{ranks}; "
          f"budget {budget_text(manifest())}", flush=True)

    loader = make_dataloader(device_batch_size, device, seed=seed, rank=rank, world_size=world_size)
    inputs, targets, epoch = next(loader)
    # The budget: TRAIN_TOKENS on the cpu profiles (the same work on a busy machine as on a quiet one),
    # TIME_BUDGET seconds of wall time on a GPU, as upstream. The helper measures the compute either way.
    training_seconds, training_wall_seconds, step, smooth_loss = 0.0, 0.0, 0, None
    while True:
        step_start, step_wall_start = training_clock(), time.time()
        for micro_step in range(accumulation):
            # under DDP the gradients are all-reduced once, in the backward of the last pass
            last_pass = micro_step == accumulation - 1
            with train_forward.no_sync() if distributed and not last_pass else nullcontext():
                with autocast:
                    loss = train_forward(inputs, targets)
                (loss / accumulation).backward()
            last_loss = loss.detach()
            inputs, targets, epoch = next(loader)
        progress = min(step * TOTAL_BATCH_SIZE / TRAIN_TOKENS if TRAIN_TOKENS else training_seconds / TIME_BUDGET, 1.0)
        multiplier = learning_rate_multiplier(progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
            if group["kind"] == "muon":
                group["momentum"] = 0.85 + 0.10 * min(step / 300, 1.0)  # momentum warmup over 300 steps
                group["weight_decay"] = WEIGHT_DECAY * (1 - progress)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        loss_value = last_loss.item()  # waits for the step to finish (so the clock needs no synchronize)
        step_seconds, step_wall_seconds = training_clock() - step_start, time.time() - step_wall_start
        if distributed:
            loss_value, step_seconds = combine_ranks(loss_value, step_seconds, world_size, device)
        if not math.isfinite(loss_value) or loss_value > FAST_FAIL_LOSS:
            print(f"fast_fail: training loss {loss_value} at step {step}", flush=True)
            sys.exit(3)
        if step >= untimed_steps:
            training_seconds += step_seconds
            training_wall_seconds += step_wall_seconds
        step += 1
        smooth_loss = loss_value if smooth_loss is None else 0.9 * smooth_loss + 0.1 * loss_value
        tokens_per_second = TOTAL_BATCH_SIZE / step_wall_seconds
        mfu = 100 * tokens_per_second * flops_per_token / peak if peak else 0.0
        if step % 10 == 0 or step <= 3:
            print(f"step {step:05d} | loss {smooth_loss:.4f} | lr x{multiplier:.2f} | {step_wall_seconds * 1000:.0f} ms "
                  f"| {tokens_per_second:,.0f} tok/s | mfu {mfu:.1f}% | epoch {epoch} "
                  f"| {budget_left(step, training_seconds)} left", flush=True)
        if step == 1:
            # Python's cyclic GC stalls for hundreds of ms at random; nothing here needs it.
            gc.collect()
            gc.freeze()
            gc.disable()
        if step * TOTAL_BATCH_SIZE >= TRAIN_TOKENS if TRAIN_TOKENS else training_seconds >= TIME_BUDGET:
            break

    timed_steps = max(step - untimed_steps, 1)
    if rank:
        # rank 0 evaluates, saves the model for the referee and prints the summary; the others wait
        # for it, so that nothing they print on their way out lands inside its summary block
        end_distributed()
        return
    # val_bpb in-process when the evaluation data is readable (None under the helpers' sandbox),
    # and the model saved for the referee when the helpers ask for it.
    scores = evaluate_and_save(model, forward, DEVICE_BATCH_SIZE, autocast)
    total_tokens = step * TOTAL_BATCH_SIZE
    average_tokens_per_second = timed_steps * TOTAL_BATCH_SIZE / max(training_wall_seconds, 1e-9)
    mfu = 100 * average_tokens_per_second * flops_per_token / peak if peak else 0.0
    upstream_mfu = 100 * average_tokens_per_second * upstream_flops_per_token / peak if peak else 0.0
    peak_vram = torch.cuda.max_memory_allocated() / 2**20 if on_cuda else 0.0
    print("---")
    if scores["val_bpb"] is not None:  # under the helpers, the referee's line is appended instead
        print(f"val_bpb:          {scores['val_bpb']:.6f}")
    print(f"training_seconds: {training_seconds:.1f}")
    print(f"total_seconds:    {time.time() - started:.1f}")
    print(f"peak_vram_mb:     {peak_vram:.1f}")
    print(f"mfu_percent:      {mfu:.2f}")
    print(f"total_tokens_M:   {total_tokens / 1e6:.1f}")
    print(f"num_steps:        {step}")
    print(f"num_params_M:     {total_params / 1e6:.1f}")
    print(f"depth:            {DEPTH}")
    print(f"tokens_per_sec:   {average_tokens_per_second:.0f}")
    print(f"mfu_upstream_percent: {upstream_mfu:.2f}")
    print(f"mfu_basis:        {mfu_basis}")
    print(f"clock:            {'cpu_time' if PROFILE in CPU_PROFILES else 'wall_time'}")
    print(f"training_wall_seconds: {training_wall_seconds:.1f}")
    print(f"eval_seconds:     {scores['eval_seconds']:.1f}")
    print(f"export_seconds:   {scores['export_seconds']:.1f}")
    print(f"evaluation:       {'referee' if scores['val_bpb'] is None else 'in-process'}")
    print(f"device:           {torch.cuda.get_device_name(device) if on_cuda else platform.processor() or device.type}")
    print(f"profile:          {PROFILE}")
    print(f"seed:             {seed}")
    if distributed:
        print(f"world_size:       {world_size}", flush=True)
        end_distributed()


if __name__ == "__main__":
    main()
