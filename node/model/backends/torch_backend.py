"""The PyTorch backend: transformers + peft, on CPU or CUDA.

Generation is batched: prompts are left-padded into one batch, prefilled once, then decoded a
token at a time against the KV cache (transformers' ``DynamicCache``); every row samples with its
own seed through ``verification.sampling`` (seeded Gumbel-max), so any sample can be replayed alone.
Adapters are PEFT LoRA adapters loaded by name next to the one base model; switching between
them (or back to the base) does not reload anything.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from node.model.backends import Generation, Sampling, Steering, Step
from node.model.batching import left_pad
from protocol.rollouts import ComputeProfile, Dtype
from verification.sampling import sample, sampling_logprobs

DTYPES: dict[torch.dtype, Dtype] = {torch.float32: "fp32", torch.bfloat16: "bf16",
                                    torch.float16: "fp16"}  # fmt: skip
TORCH_DTYPES: dict[Dtype, torch.dtype] = {name: dtype for dtype, name in DTYPES.items()}

PREFILL_BATCH_TOKENS = 4096
"""Padded tokens per replay forward pass: bounds the logits a batch holds (tokens × vocabulary)."""


class TorchBackend:
    name = "torch"

    def __init__(self, model: Any, tokenizer: Any, device: str = "cpu") -> None:
        self.base = model
        self.model = model  # becomes a PeftModel once an adapter is loaded
        self.tokenizer = tokenizer
        self.device = device
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos or tokenizer.eos_token_id])
        self.adapters: set[str] = set()

    @classmethod
    def from_pretrained(cls, ref: str, device: str = "cpu", dtype: Any = None) -> TorchBackend:
        from node.model.loading import load_pretrained

        model, tokenizer = load_pretrained(ref, dtype=dtype, device=device)
        return cls(model, tokenizer, device)

    @property
    def profile(self) -> ComputeProfile:
        """How this backend computes: what a verifier's thresholds for its work depend on."""
        dtype = DTYPES.get(self.base.dtype, "fp32")
        device, threads = str(self.device), 0
        if device.startswith("cuda"):
            device = f"cuda:{torch.cuda.get_device_name(torch.device(device))}"
        else:
            device = f"cpu:{torch.backends.cpu.get_cpu_capability()}"
            threads = torch.get_num_threads()
        return ComputeProfile(backend=self.name, dtype=dtype, device=device, threads=threads)

    def reproduces(self, profile: ComputeProfile | None) -> bool:
        """Whether ``generate_as(profile, ...)`` gives the bits a backend of ``profile`` did: the
        same backend, dtype and device class, on CPU with a known thread count."""
        own = self.profile
        return (
            profile is not None
            and profile.threads > 0
            and (profile.backend, profile.dtype, profile.device)
            == (own.backend, own.dtype, own.device)
        )

    def generate_as(
        self,
        profile: ComputeProfile,
        prompts: list[list[int]],
        seeds: list[int],
        sampling: Sampling,
        adapter: str | None = None,
    ) -> list[Generation]:
        """``generate`` on ``profile``'s thread count (restored after): a producer's exact run."""
        own = torch.get_num_threads()
        torch.set_num_threads(profile.threads)
        try:
            return self.generate(prompts, seeds, sampling, adapter)
        finally:
            torch.set_num_threads(own)

    # -- adapters -----------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str) -> None:
        """Load a PEFT adapter under ``name``; the base weights stay as they are."""
        from peft import PeftModel

        if name in self.adapters:
            self.model.delete_adapter(name)
            self.adapters.discard(name)
        if not self.adapters and not isinstance(self.model, PeftModel):
            self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name)
        else:
            self.model.load_adapter(path, adapter_name=name)
        self.model.eval()
        self.adapters.add(name)

    def unload_adapter(self, name: str) -> None:
        """Drop a loaded adapter (its memory is freed; the base is untouched)."""
        if name not in self.adapters:
            return
        if self.adapters == {name}:  # the last one: take the LoRA layers out of the base again
            self.model = self.base = self.model.unload()
        else:
            self.model.delete_adapter(name)
        self.adapters.discard(name)

    def _select(self, adapter: str | None) -> Any:
        """The module to run: the active adapter, or the base with adapters disabled."""
        if adapter is None:
            return self.model.disable_adapter() if self.adapters else nullcontext()
        if adapter not in self.adapters:
            raise ValueError(f"adapter {adapter!r} is not loaded (loaded: {sorted(self.adapters)})")
        self.model.set_adapter(adapter)
        return nullcontext()

    # -- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        seeds: list[int],
        sampling: Sampling,
        adapter: str | None = None,
        steering: Steering | None = None,
    ) -> list[Generation]:
        """One generation per prompt, row ``i`` sampled with ``seeds[i]``; ``steering`` (served
        requests): grammar masks before each pick, top logprobs, a callback per step."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        steer = steering or Steering()
        ids_B_W, mask_B_W = left_pad(prompts, self.tokenizer.pad_token_id)
        ids_B_W, mask_B_W = ids_B_W.to(self.device), mask_B_W.to(self.device)
        pos_B_W = (mask_B_W.cumsum(-1) - 1).clamp(min=0)
        seeds_B = torch.tensor(seeds, dtype=torch.int64)
        tokens: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        tops: list[list[list[tuple[int, float]]]] = [[] for _ in prompts]
        reasons: list[str | None] = [None] * len(prompts)
        with self._select(adapter):
            out = self.model(
                input_ids=ids_B_W, attention_mask=mask_B_W, position_ids=pos_B_W, use_cache=True
            )
            past, logits_B_V, pos_B = out.past_key_values, out.logits[:, -1, :], pos_B_W[:, -1]
            for step in range(sampling.max_tokens):
                step_B = torch.full((len(prompts),), step, dtype=torch.int64)
                logits_B_V = logits_B_V.cpu()
                if steer.constraints:
                    logits_B_V = self._masked(logits_B_V, steer.constraints, reasons)
                tok_B, logp_B = sample(
                    logits_B_V, seeds_B, step_B, sampling.temperature, sampling.top_p
                )
                top_B = self._top(logits_B_V, sampling, steer.top_logprobs)
                # one conversion per step: indexing tensors element by element costs more
                # than the small model's forward pass at large batches
                steps = []
                for i, (tok, logp) in enumerate(zip(tok_B.tolist(), logp_B.tolist(), strict=True)):
                    if reasons[i] is None:
                        tokens[i].append(tok)
                        logprobs[i].append(logp)
                        if top_B is not None:
                            tops[i].append(top_B[i])
                        steps.append(Step(i, tok, logp, top_B[i] if top_B is not None else []))
                        constraint = steer.constraints[i] if steer.constraints else None
                        if constraint is not None:
                            constraint.advance(tok)
                        if tok in self.eos_ids and not sampling.ignore_eos:
                            reasons[i] = "stop"
                        elif constraint is not None and constraint.done:
                            reasons[i] = "stop"  # the grammar is complete: nothing may follow
                if steer.on_step is not None:
                    for i in steer.on_step(steps):
                        reasons[i] = reasons[i] or "stop"
                if all(r is not None for r in reasons) or step == sampling.max_tokens - 1:
                    break
                next_B_1 = tok_B.view(-1, 1).to(self.device)
                mask_B_W = torch.cat([mask_B_W, torch.ones_like(next_B_1)], dim=1)
                pos_B = pos_B + 1
                out = self.model(
                    input_ids=next_B_1,
                    attention_mask=mask_B_W,
                    position_ids=pos_B.view(-1, 1),
                    past_key_values=past,
                    use_cache=True,
                )
                past, logits_B_V = out.past_key_values, out.logits[:, -1, :]
        return [
            Generation(t, lp, "stop" if r == "stop" else "length", top)
            for t, lp, r, top in zip(tokens, logprobs, reasons, tops, strict=True)
        ]

    @staticmethod
    def _masked(
        logits_B_V: torch.Tensor, constraints: list[Any], reasons: list[str | None]
    ) -> torch.Tensor:
        """Each constrained row's logits with the tokens its grammar forbids at -inf."""
        rows = [i for i, c in enumerate(constraints) if c is not None and reasons[i] is None]
        if not rows:
            return logits_B_V
        vocab = logits_B_V.shape[-1]
        allowed_B_V = torch.ones(logits_B_V.shape, dtype=torch.bool)
        for i in rows:
            allowed_B_V[i] = constraints[i].allowed(vocab)
        return logits_B_V.to(torch.float32).masked_fill(~allowed_B_V, float("-inf"))

    @staticmethod
    def _top(
        logits_B_V: torch.Tensor, sampling: Sampling, k: int
    ) -> list[list[tuple[int, float]]] | None:
        """Each row's ``k`` most likely tokens under the distribution sampled from."""
        if k <= 0:
            return None
        logp_B_V = sampling_logprobs(logits_B_V, sampling.temperature, sampling.top_p)
        values, ids = torch.topk(logp_B_V, min(k, logp_B_V.shape[-1]), dim=-1)
        return [
            [(t, v) for t, v in zip(row_ids, row_values, strict=True) if v > float("-inf")]
            for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)
        ]

    @torch.no_grad()
    def prefill_logits(
        self, prompt: list[int], completion: list[int], adapter: str | None = None
    ) -> torch.Tensor:
        """Logits ``[T, V]`` that produced each completion token, from one forward pass."""
        return self.prefill_batch([(prompt, completion)], adapter)[0]

    @torch.no_grad()
    def prefill_batch(
        self,
        pairs: list[tuple[list[int], list[int]]],
        adapter: str | None = None,
        max_batch_tokens: int = PREFILL_BATCH_TOKENS,
    ) -> list[torch.Tensor]:
        """``prefill_logits`` of many (prompt, completion) pairs, a few forward passes in all.

        Pairs that share a prompt (a lease's group) share its prefill, as in generation: each
        distinct prompt is prefilled once (left-padded, as ``generate`` does), its KV cache
        copied to the rows that continue it, and every row's completion then goes through in
        one pass on top (right-padded: a causal row never sees the padding after it). Prompts
        are taken in batches of at most ``max_batch_tokens`` padded tokens, prompt and
        completion rows together."""
        out: list[torch.Tensor | None] = [None] * len(pairs)
        rows_of: dict[tuple[int, ...], list[int]] = {}
        for i, (prompt, _) in enumerate(pairs):
            if not prompt:
                raise ValueError("a replayed completion needs a prompt of at least one token")
            rows_of.setdefault(tuple(prompt), []).append(i)
        groups = sorted(rows_of.values(), key=lambda rows: len(pairs[rows[0]][0]))
        with self._select(adapter):
            batch: list[list[int]] = []
            for rows in groups:
                if batch and self._padded([*batch, rows], pairs) > max_batch_tokens:
                    self._prefill_groups(pairs, batch, out)
                    batch = []
                batch.append(rows)
            if batch:
                self._prefill_groups(pairs, batch, out)
        return [t for t in out if t is not None]

    @staticmethod
    def _padded(groups: list[list[int]], pairs: list[tuple[list[int], list[int]]]) -> int:
        """Padded tokens of a batch of groups: its prompts, and its rows' completions."""
        width = max(len(pairs[g[0]][0]) for g in groups)
        rows = [i for g in groups for i in g]
        return len(groups) * width + len(rows) * max(len(pairs[i][1]) for i in rows)

    def _prefill_groups(
        self,
        pairs: list[tuple[list[int], list[int]]],
        groups: list[list[int]],
        out: list[torch.Tensor | None],
    ) -> None:
        prompts = [pairs[g[0]][0] for g in groups]
        ids_G_W, mask_G_W = (t.to(self.device) for t in left_pad(prompts, self._pad_id()))
        pos_G_W = (mask_G_W.cumsum(-1) - 1).clamp(min=0)
        first = self.model(
            input_ids=ids_G_W, attention_mask=mask_G_W, position_ids=pos_G_W,
            use_cache=True, logits_to_keep=1,
        )  # fmt: skip
        first_G_V = first.logits[:, -1].float().cpu()
        rows = [i for g in groups for i in g]
        group_B = torch.tensor([k for k, g in enumerate(groups) for _ in g], device=self.device)
        # completion tokens but the last go in (the last token's logits predict nothing here)
        rest = [pairs[i][1][:-1] for i in rows]
        width = max(len(r) for r in rest)
        rest_B_T = torch.zeros((len(rows), width), dtype=torch.long, device=self.device)
        logits_B_T_V = torch.zeros(0)
        if width:
            cache = first.past_key_values
            cache.reorder_cache(group_B)  # each row continues its own prompt's cache
            rest_B_T.fill_(self._pad_id())
            rest_mask_B_T = torch.zeros_like(rest_B_T)
            for b, r in enumerate(rest):
                rest_B_T[b, : len(r)] = torch.tensor(r)
                rest_mask_B_T[b, : len(r)] = 1
            mask_B_L = torch.cat([mask_G_W[group_B], rest_mask_B_T], dim=1)
            pos_B_T = pos_G_W[group_B, -1:] + 1 + torch.arange(width, device=self.device)
            logits_B_T_V = self.model(
                input_ids=rest_B_T, attention_mask=mask_B_L, position_ids=pos_B_T,
                past_key_values=cache, use_cache=True,
            ).logits.float().cpu()  # fmt: skip
        for b, i in enumerate(rows):
            n = len(pairs[i][1])
            if n == 0:
                out[i] = torch.zeros(0, first_G_V.shape[-1])
                continue
            head = first_G_V[int(group_B[b])].unsqueeze(0)
            out[i] = torch.cat([head, logits_B_T_V[b, : n - 1]]) if n > 1 else head

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else 0)
