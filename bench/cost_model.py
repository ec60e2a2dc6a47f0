"""A cost model of one online SPO optimizer step for a 7–8B model on 8 GPUs: what this CPU machine cannot
measure, worked out on paper from the model's shapes and the step's layout.

Run: `.venv/bin/python bench/cost_model.py` prints the markdown section that `bench/run_all.py` puts in
bench/RESULTS.md. Parameter counts and forward FLOPs are checked against a real transformers Llama by
tests/test_cost_model.py (numel and torch's FlopCounterMode); everything else is arithmetic on them plus the
stated hardware figures and published anchors.

Conventions: a forward is 2 FLOPs per multiply-accumulate of every linear layer per token, plus the
attention matmuls over the whole [T, T] square (spo_ray's shared-prompt layout runs a 4-D mask through
SDPA, which computes the full square), plus the LM head at the positions that predict a response token
only (what spo_ray's step and its chunked KL term do). A backward is 2 forwards; gradient checkpointing
adds one more forward.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GB = 1e9


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder: the numbers of a Hugging Face config."""

    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = False
    qkv_bias: bool = False

    def layer_matmul_params(self) -> int:
        """Weights of one block's linear layers (what its matmuls multiply by; biases apart)."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = self.hidden * (q_out + 2 * kv_out) + q_out * self.hidden
        return attention + 3 * self.hidden * self.intermediate

    def params(self) -> int:
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        per_layer = self.layer_matmul_params() + bias + 2 * self.hidden  # and two RMSNorm weights
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + self.layers * per_layer + self.hidden + head

    def lora_params(self, rank: int) -> int:
        """A LoRA adapter of `rank` on every linear layer of every block: r·(in + out) per layer."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        fans = [
            (self.hidden, q_out),
            (self.hidden, kv_out),
            (self.hidden, kv_out),
            (q_out, self.hidden),
            (self.hidden, self.intermediate),
            (self.hidden, self.intermediate),
            (self.intermediate, self.hidden),
        ]
        return self.layers * rank * sum(fan_in + fan_out for fan_in, fan_out in fans)

    def forward_flops(self, seq_len: int, head_positions: int, rows: int = 1) -> float:
        """FLOPs of `rows` forwards of `seq_len` tokens, the LM head at `head_positions` of each."""
        linear = 2 * self.layer_matmul_params() * seq_len
        attention = 2 * 2 * seq_len * seq_len * self.heads * self.head_dim  # Q·Kᵀ and P·V
        head = 2 * self.hidden * self.vocab * head_positions
        return rows * (self.layers * (linear + attention) + head)


LLAMA_31_8B = Shape("Llama-3.1-8B", 128256, 4096, 14336, 32, 32, 8, 128)
QWEN_25_7B = Shape("Qwen2.5-7B", 152064, 3584, 18944, 28, 28, 4, 128, qkv_bias=True)


@dataclass(frozen=True)
class Step:
    """One optimizer step's work. Defaults: NeMo-RL's DPO recipe batch (256 pairs), 512-token prompts and
    responses, and a global KL on one 512-token sample for every 4th pair (configs' prompts_per_step ratio)."""

    pairs: int = 256
    prompt: int = 512
    response: int = 512
    samples: int = 64
    sample_prompt: int = 512
    sample_tokens: int = 512
    loss: str = "spo"  # spo reads no reference in its preference term; dpo does unless precomputed
    precompute_ref: bool = False
    checkpointing: bool = True


@dataclass(frozen=True)
class Hardware:
    """8 × H100 SXM 80 GB. `mfu` is an assumption (checked below against NeMo-RL's DPO step time)."""

    gpus: int = 8
    peak_flops: float = 989e12  # dense bf16
    mfu: float = 0.40
    hbm_bytes_per_s: float = 3.35e12
    memory_gb: float = 80.0


# Sync bandwidths per transport, bytes/s: the anchors the issue names, and a stated assumption for Ray's store.
TRANSPORTS = {
    "object_store (Ray, host memory; one node)": 5 * GB,  # assumed: D2H + one copy into plasma + H2D
    "nccl (broadcast over InfiniBand; verl's measured 8.25 GB/s)": 8.25 * GB,
    "cuda_ipc (same node; SkyRL: 14B bf16 = 29.5 GB in 1.6 s)": 29.5 * GB / 1.6,
}


def step_flops(shape: Shape, step: Step) -> dict[str, float]:
    passes = 4 if step.checkpointing else 3  # forward + backward (2) + the recomputed forward
    row = step.prompt + 2 * step.response  # spo_ray's layout: the prompt once, both responses behind it
    preference = shape.forward_flops(row, 2 * step.response, step.pairs) * passes
    if step.loss != "spo" and not step.precompute_ref:
        preference += shape.forward_flops(row, 2 * step.response, step.pairs)
    sample = step.sample_prompt + step.sample_tokens
    kl = shape.forward_flops(sample, step.sample_tokens, step.samples) * (passes + 1)  # + reference forward
    padded = 2 * step.pairs * (step.prompt + step.response)  # TRL/NeMo-style: chosen and rejected rows
    return {
        "preference": preference,
        "kl": kl,
        "tokens_per_step": step.pairs * row,
        "padded_tokens_per_step": padded,
    }


def generation(shape: Shape, step: Step, hw: Hardware) -> dict[str, float]:
    """Decoding is bound by reading the bf16 weights once per token step, whatever the batch (up to a
    few hundred sequences): sample_tokens steps, plus a compute-bound prefill of the prompts."""
    weights = 2 * shape.params()
    decode_s = step.sample_tokens * weights / hw.hbm_bytes_per_s
    prefill_s = shape.forward_flops(step.sample_prompt, 1, step.samples) / (hw.peak_flops * hw.mfu)
    return {
        "tokens": step.samples * step.sample_tokens,
        "prompt_tokens": step.samples * step.sample_prompt,
        "decode_s": decode_s,
        "prefill_s": prefill_s,
    }


def sync_bytes(shape: Shape, lora_rank: int = 8) -> dict[str, float]:
    n = shape.params()
    return {
        "full, float32 master weights (what is sent today)": 4 * n,
        "full, cast to bf16 (the engine's dtype)": 2 * n,
        f"LoRA r={lora_rank} adapter, float32": 4 * shape.lora_params(lora_rank),
    }


def memory_per_worker(shape: Shape, hw: Hardware, lora_rank: int = 8) -> dict[str, float]:
    """GB of model state per GPU worker (activations apart): float32 master weights, gradients and AdamW's
    two moments (16 bytes per trained parameter); the reference in bf16 (2 bytes); FSDP shards both."""
    n, adapter = shape.params(), shape.lora_params(lora_rank)
    full, reference = 16 * n, 2 * n
    return {
        "full FT, DDP, no reference": full / GB,
        "full FT, DDP, with reference": (full + reference) / GB,
        f"full FT, FSDP over {hw.gpus}, no reference": full / hw.gpus / GB,
        f"full FT, FSDP over {hw.gpus}, with reference": (full + reference) / hw.gpus / GB,
        f"LoRA r={lora_rank}, bf16 base (the reference is the base, adapter off)": (2 * n + 16 * adapter)
        / GB,
    }


def activation_gb(shape: Shape, tokens: int) -> float:
    """Gradient checkpointing keeps each block's bf16 input: layers × hidden × 2 bytes per token."""
    return shape.layers * shape.hidden * 2 * tokens / GB


def nemo_dpo_implied_mfu(shape: Shape = LLAMA_31_8B, seconds: float = 24.0, gpus: int = 32) -> float:
    """NeMo-RL's DPO recipe (Llama-3.1-8B, global batch 256, sequences up to 2048, padded chosen and
    rejected rows, reference forward): the MFU its step ceiling implies if every sequence were full length."""
    flops = shape.forward_flops(2048, 2048, 2 * 256) * 4 + shape.forward_flops(2048, 2048, 2 * 256)
    return flops / (seconds * gpus * 989e12)


def report(shapes=(QWEN_25_7B, LLAMA_31_8B), step: Step = Step(), hw: Hardware = Hardware()) -> list[str]:
    def row(label: str, values: list[str]) -> str:
        return f"| {label} | " + " | ".join(values) + " |"

    lines = [
        "## The GPU picture, on paper: a 7–8B model on 8 GPUs (bench/cost_model.py)",
        "",
        f"One optimizer step: {step.pairs} pairs of {step.prompt}-token prompts and two {step.response}-token "
        f"responses; the global KL on {step.samples} online samples of {step.sample_tokens} tokens; gradient "
        f"checkpointing on; {hw.gpus} × H100 80 GB at an assumed {hw.mfu:.0%} MFU of {hw.peak_flops / 1e12:.0f} "
        "bf16 TFLOP/s. FLOPs and parameter counts are checked against a real transformers Llama "
        "(tests/test_cost_model.py); the rest is arithmetic on them.",
        "",
        "| per optimizer step | " + " | ".join(s.name for s in shapes) + " |",
        "|---|" + "---|" * len(shapes),
    ]
    flops = {s.name: step_flops(s, step) for s in shapes}
    dpo = {s.name: step_flops(s, replace(step, loss="dpo")) for s in shapes}
    gen = {s.name: generation(s, step, hw) for s in shapes}
    rate = hw.gpus * hw.peak_flops * hw.mfu
    lines.append(row("parameters", [f"{s.params() / 1e9:.2f} B" for s in shapes]))
    lines.append(
        row(
            "tokens in the preference forward (spo_ray layout / padded pairs)",
            [
                f"{flops[s.name]['tokens_per_step']:,} / {flops[s.name]['padded_tokens_per_step']:,}"
                for s in shapes
            ],
        )
    )
    for key, label in (("preference", "preference step FLOPs, SPO (no reference)"),):
        lines.append(
            row(
                label,
                [f"{flops[s.name][key] / 1e15:.1f} PF = {flops[s.name][key] / rate:.2f} s" for s in shapes],
            )
        )
    lines.append(
        row(
            "preference step FLOPs, DPO (reference forward each step)",
            [
                f"{dpo[s.name]['preference'] / 1e15:.1f} PF = {dpo[s.name]['preference'] / rate:.2f} s"
                for s in shapes
            ],
        )
    )
    lines.append(
        row(
            "global-KL forwards FLOPs (policy fwd+bwd, reference fwd)",
            [f"{flops[s.name]['kl'] / 1e15:.1f} PF = {flops[s.name]['kl'] / rate:.2f} s" for s in shapes],
        )
    )
    lines.append(
        row(
            "generation: tokens; decode + prefill on one engine",
            [
                f"{gen[s.name]['tokens']:,}; {gen[s.name]['decode_s']:.2f} + {gen[s.name]['prefill_s']:.2f} s"
                for s in shapes
            ],
        )
    )
    sizes = {s.name: sync_bytes(s) for s in shapes}
    for label in sizes[shapes[0].name]:
        lines.append(row(f"sync bytes: {label}", [f"{sizes[s.name][label] / GB:.2f} GB" for s in shapes]))
    bf16 = "full, cast to bf16 (the engine's dtype)"
    for transport, bandwidth in TRANSPORTS.items():
        lines.append(
            row(
                f"sync time of the bf16 weights: {transport}",
                [f"{sizes[s.name][bf16] / bandwidth:.2f} s" for s in shapes],
            )
        )
    memory = {s.name: memory_per_worker(s, hw) for s in shapes}
    for label in memory[shapes[0].name]:
        lines.append(row(f"memory per worker: {label}", [f"{memory[s.name][label]:.1f} GB" for s in shapes]))
    per_row = step.prompt + 2 * step.response
    lines.append(
        row(
            f"activations, checkpointed, per {per_row}-token pair row",
            [f"{activation_gb(s, per_row):.2f} GB" for s in shapes],
        )
    )
    nemo = nemo_dpo_implied_mfu()
    lines += [
        "",
        "Anchors. NeMo-RL's DPO recipe for Llama-3.1-8B (global batch 256, sequences up to 2,048, chosen and "
        "rejected padded apart, a reference forward, 32 H100) steps in under 24 s: with every sequence at full "
        f"length that is {nemo:.0%} MFU, so its ceiling bounds MFU from below only; at the {hw.mfu:.0%} assumed "
        f"here the same work takes {24 * nemo / hw.mfu:.1f} s on 32 GPUs. verl's 8.25 GB/s NCCL sync over "
        "InfiniBand moves Qwen3-30B-A3B (61 GB in bf16) in about 7 s; SkyRL's batched CUDA IPC moves a 14B "
        "model (TP 2) in 1.6 s.",
        "",
    ]
    big = shapes[-1]
    compute = (flops[big.name]["preference"] + flops[big.name]["kl"]) / rate
    today = sizes[big.name]["full, float32 master weights (what is sent today)"]
    store = next(iter(TRANSPORTS.values()))
    gen_s = gen[big.name]["decode_s"] + gen[big.name]["prefill_s"]
    lines.append(
        f"What dominates ({big.name}): compute, {compute:.1f} s per step (preference step and KL forwards). "
        f"Next is the weight sync: the float32 master weights ({today / GB:.0f} GB) through the object store "
        f"take {today / store:.1f} s at the assumed {store / GB:.0f} GB/s, and the trainer waits for it; in bf16 "
        f"over CUDA IPC the same sync is {sizes[big.name][bf16] / TRANSPORTS[list(TRANSPORTS)[2]]:.1f} s. "
        f"Generation ({gen_s:.1f} s on one engine, decode-bound) is requested while the previous step computes "
        "(`rollout.overlap`), so it hides behind compute as long as it stays shorter. The KL forwards cost "
        f"{flops[big.name]['kl'] / flops[big.name]['preference']:.0%} of the preference step's FLOPs, and the "
        "chunked KL keeps their logits to 64 MiB chunks instead of [samples, tokens, vocabulary]."
    )
    adapter = sizes[big.name]["LoRA r=8 adapter, float32"]
    lines += [
        "",
        "What the code does about the sync: with LoRA only the adapter travels "
        f"({adapter / 1e6:.0f} MB here, {today / adapter:.0f}× less than the merged float32 model; "
        "`rollout.lora_sync`, measured 54.8× fewer bytes and 21.5× faster on SmolLM2 above); the object store "
        "carries numpy buckets that `ray.put` copies once and the engines map from shared memory; "
        "`rollout.transport=nccl|cuda_ipc` uses vLLM's GPU weight transfer; `rollout.sync_every` spreads the "
        "cost over steps. Not done yet: casting the full-model payload to the engines' dtype before it leaves "
        "the trainer (half the bytes of a float32 sync), and a sync that runs while the trainer goes on "
        "(issue 15 items 1–2).",
    ]
    return lines


if __name__ == "__main__":
    print("\n".join(report()))
