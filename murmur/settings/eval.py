"""Settings of the evaluation stage (`murmur eval`).

The defaults are sized so that a ~6M-parameter model evaluates in about a minute on two CPU cores;
raise the caps for a final report on a real model.
"""

from typing import Literal

from pydantic import Field

from murmur.settings.base import Section

DEFAULT_PROMPTS = [
    "hey, how was your weekend?",
    "what are you reading these days?",
    "any tips for learning to cook?",
    "the train was late again this morning",
    "what do you think about remote work?",
    "recommend me a good movie",
]


class EvalSettings(Section):
    """What to measure after training, and how much of it."""

    seed: int = Field(0, description="seed of every random choice: examples, distractors, canary candidates")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(32, gt=0, description="sequences per forward pass when scoring")
    checkpoints: Literal["latest", "all"] = Field(
        "all", description="bits per byte of every saved checkpoint too (on bpb_checkpoint_posts posts), or "
                           "of the final model only")

    # Bits per byte on held-out posts.
    bpb_splits: list[str] = Field(default_factory=lambda: ["validation", "test"])
    bpb_max_posts: int = Field(1000, gt=0, description="posts per split scored (a fixed seeded sample)")
    bpb_checkpoint_posts: int = Field(200, gt=0, description="posts per split for each earlier checkpoint")

    # Reply ranking on held-out conversations.
    ranking_split: str = "test"
    ranking_examples: int = Field(50, ge=0, description="contexts ranked (a seeded sample; the results state the "
                                  "standard error it leaves); 0 skips reply ranking")
    distractors: int = Field(19, gt=0, description="wrong replies beside the true one")
    max_context_tokens: int = Field(96, gt=0, description="context kept (its last tokens) when scoring replies")
    max_reply_tokens: int = Field(48, gt=0, description="reply tokens scored (longer replies are cut)")

    # Samples at fixed seeds.
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS))
    sample_seeds: list[int] = Field(default_factory=lambda: [0, 1])
    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)

    # Privacy probes.
    canary_candidates: int = Field(999, gt=0, description="random secrets of the same shape ranked against each canary")
