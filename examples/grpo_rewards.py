"""Reward functions for examples/grpo_lora.yaml: each gets the prompts, the sampled completions (text) and the
dataset's columns (`answer`: the SFT row's own answer) and returns one float per completion."""


def answer_overlap(completions, answer, **kwargs):
    """The share of the reference answer's words that the completion uses (0 to 1)."""
    rewards = []
    for completion, reference in zip(completions, answer, strict=True):
        wanted = set(reference.lower().split())
        rewards.append(len(wanted & set(completion.lower().split())) / max(len(wanted), 1))
    return rewards


def brevity(completions, **kwargs):
    """Shorter is better, up to 200 characters: 1 for an empty answer, 0 from 200 characters on."""
    return [max(0.0, 1.0 - len(completion) / 200) for completion in completions]
