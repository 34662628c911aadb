"""``reasoning_gym:<task>``: any of reasoning-gym's procedural tasks, scored by its own scorer.

reasoning-gym (the ``envs`` extra) generates each task from a seed; here every example gets a
seed derived from (environment, version, seed, index), so it is reproducible by any peer like
the built-ins. Its ``score_answer`` gives the reward (partial credit where the task defines it).
"""

from __future__ import annotations

import random
from typing import Any

from envs.base import Environment, Rubric
from envs.parsers import AnswerParser, Completion


class ReasoningGymEnv(Environment):
    env_id = "reasoning_gym"
    version = "1"
    system_prompt = "Answer the question. Give only the final answer as <answer>...</answer>."

    def __init__(self, task: str, **config: Any) -> None:
        try:
            import reasoning_gym
            from reasoning_gym.factory import DATASETS
        except ImportError:
            raise ValueError("reasoning-gym is not installed: pip install 'bazaar[envs]'") from None
        if task not in DATASETS:
            raise ValueError(f"reasoning-gym has no task {task!r}; it has {len(DATASETS)}, e.g. "
                             f"{', '.join(sorted(DATASETS)[:8])}")  # fmt: skip
        self.task, self.config = task, config
        self._create = reasoning_gym.create_dataset
        self._create(task, seed=0, size=1, **config)  # bad config fails here, at load time
        super().__init__(Rubric([self.task_score], [1.0], AnswerParser()))

    def _dataset_and_entry(self, item_seed: int) -> tuple[Any, dict[str, Any]]:
        dataset = self._create(self.task, seed=item_seed, size=1, **self.config)
        return dataset, dataset[0]

    def make_example(self, rng: random.Random) -> tuple[str, str, dict[str, Any]]:
        item_seed = rng.randrange(2**31)
        _, entry = self._dataset_and_entry(item_seed)
        return entry["question"], str(entry["answer"]), {"item_seed": item_seed}

    def task_score(
        self, completion: Completion, info: dict[str, Any], parser: AnswerParser
    ) -> float:
        """reasoning-gym's own score for the parsed answer (0 when none could be parsed)."""
        answer = parser.parse_answer(completion)
        if answer is None:
            return 0.0
        dataset, entry = self._dataset_and_entry(info["item_seed"])
        return float(dataset.score_answer(answer=answer, entry=entry))
