"""The tiny agent model: the tiny model warm-started on tool calls, so it can learn a tool task.

The tiny model (``node/model/tiny.py``) never calls a tool: a call is ~80 bytes of exact JSON,
past anything reinforcement learning finds by chance. This fine-tunes it on demonstrations of
the ``calc`` environment's episodes — call ``calculate`` on the question's numbers, read the
result, answer with it — built with the very episode machinery producers sample with
(``verification.episodes``: the model's turns as tokens, the environment's rendered by the chat
template), with the loss on the model's turns only. It stops once greedy episodes solve
``target_accuracy`` of held-out examples — on purpose well short of all, so that reinforcement
learning has room — and is cached beside the tiny model (``tiny-agent-v1-...``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

META_FILE = "bazaar-tiny-agent.json"


@dataclass(frozen=True)
class AgentSpec:
    seed: int = 0
    env: str = 'calc {"digits":3}'
    """The environment demonstrated (and measured)."""
    target_accuracy: float = 0.3
    max_steps: int = 1200
    batch_size: int = 16
    lr: float = 1e-3

    def cache_name(self, base: str) -> str:
        return f"tiny-agent-v1-{base}-seed{self.seed}-acc{self.target_accuracy:g}"


def ensure_tiny_agent_model(
    base: Path,
    spec: AgentSpec | None = None,
    progress: Callable[[int, float, float], None] | None = None,
) -> Path:
    """The agent model's directory beside ``base`` (the tiny model's), built first if needed."""
    spec = spec or AgentSpec()
    out = base.parent / spec.cache_name(base.name)
    if (out / META_FILE).exists():
        return out
    return build_tiny_agent_model(base, out, spec, progress)


def demonstration(env: Any, example: Any, tokenizer: Any) -> tuple[list[int], list[int]]:
    """``(input ids, labels)`` of one demonstrated episode: the prompt, the call, the tool's
    answer and the final answer — labels on the model's two turns only."""
    from verification.episodes import Episode
    from verification.rollouts import prompt_ids

    a, b = example.info["a"], example.info["b"]
    eos = tokenizer.eos_token_id
    call = json.dumps({"name": "calculate", "arguments": {"expression": f"{a} * {b}"}})
    first = [*tokenizer(f"<tool_call>{call}</tool_call>", add_special_tokens=False)["input_ids"],
             eos]  # fmt: skip
    episode = Episode.start(env, example, tokenizer)
    inserted = episode.after_model_turn(first, True)
    assert inserted is not None
    last = [*tokenizer(example.answer, add_special_tokens=False)["input_ids"], eos]
    assert episode.after_model_turn(last, True) is None
    prompt = prompt_ids(tokenizer, example.prompt)
    ids = prompt + first + inserted + last
    labels = [-100] * len(prompt) + first + [-100] * len(inserted) + last
    return ids, labels


def greedy_accuracy(backend: Any, env: Any, seed: int, n: int = 32) -> float:
    """Share of ``n`` held-out examples whose greedy episode earns the full reward."""
    from node.model.rollouts import Producer
    from protocol.leases import Lease, SamplingParams

    lease = Lease(
        lease_id="agent-eval", run_id="agent", env_id=env.name, env_version=env.version,
        env_seed=seed, example_indices=list(range(n)), group_size=1, policy_version=0,
        sampling=SamplingParams(temperature=0.0, top_p=1.0, max_tokens=96,
                                max_turns=env.max_turns),
        lease_seed=bytes(32), deadline_ms=0,
    )  # fmt: skip
    payload = Producer(backend, backend.tokenizer).produce(env, lease)
    return sum(s.reward >= 1.0 for s in payload.samples) / n


def build_tiny_agent_model(
    base: Path,
    out: Path,
    spec: AgentSpec | None = None,
    progress: Callable[[int, float, float], None] | None = None,
) -> Path:
    """Fine-tune the tiny model in ``base`` on demonstrations and save it in ``out``;
    ``progress(step, loss, accuracy)``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from envs import load_environment
    from node.model.backends.torch_backend import TorchBackend
    from node.model.tiny import pad_rows, save_model

    spec = spec or AgentSpec()
    torch.manual_seed(spec.seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    env = load_environment(spec.env)
    optim = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    rng = random.Random(spec.seed)
    accuracy, loss_value, step = 0.0, float("nan"), 0
    for step in range(1, spec.max_steps + 1):
        rows = [demonstration(env, env.example(spec.seed, rng.randrange(1 << 30)), tok)
                for _ in range(spec.batch_size)]  # fmt: skip
        ids_B_W, labels_B_W, mask_B_W = pad_rows(tok, rows)
        model.train()
        loss = model(input_ids=ids_B_W, attention_mask=mask_B_W, labels=labels_B_W).loss
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        loss_value = float(loss.detach())
        if step % 50 == 0:
            model.eval()
            accuracy = greedy_accuracy(TorchBackend(model, tok), env, 10_000 + spec.seed)
            if progress:
                progress(step, loss_value, accuracy)
            if accuracy >= spec.target_accuracy:
                break
    meta = {**asdict(spec), "base": base.name, "steps": step, "final_loss": loss_value,
            "accuracy": accuracy}  # fmt: skip
    return save_model(out, model, tok, META_FILE, meta)
